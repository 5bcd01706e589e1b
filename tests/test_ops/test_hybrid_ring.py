"""The hybrid's in-place decoding step on a ring of slots (`hf_fastattn.ops.hybrid_ring`) against the naive quadratic
hybrid over the whole sequence and against the general state-in / state-out path."""

import pytest
import torch

from hf_fastattn.ops.feature_maps import HedgehogFeatureMap
from hf_fastattn.ops.hybrid import hybrid_attention_with_state
from hf_fastattn.ops.hybrid_ring import hybrid_ring_step_, ring_from_parts, ring_to_parts
from hf_fastattn.ops.reference import hybrid_attention_reference

B, H, HKV, D, W = 2, 4, 2, 8, 5


def _sequence(n, seed=0):
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, H, n, D), torch.randn(B, HKV, n, D), torch.randn(B, HKV, n, D)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, :3] = False  # row 1 left-padded
    return q, k, v, mask


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("maps", ["elu", "hedgehog", "hedgehog-qk"])
@pytest.mark.parametrize("linear_weight", ["1-gamma", "1"])
def test_ring_steps_equal_the_quadratic_hybrid(sinks, maps, linear_weight):
    """Prefill, then 15 one-token steps on the ring (more than two turns of the window): every step's output equals
    the quadratic hybrid's at that position, and the ring's window, sinks and state equal those of the general path
    (`hybrid_attention_with_state`, one token at a time) afterwards."""
    n, prefill = 26, 11
    q, k, v, mask = _sequence(n)
    mask[1, 15] = False  # a padded token in the middle of decoding: it must never enter the softmax or the state
    torch.manual_seed(1)
    phi = "elu" if maps == "elu" else HedgehogFeatureMap(H, D)
    phi_k = HedgehogFeatureMap(H, D) if maps == "hedgehog-qk" else None
    if phi_k is not None:
        with torch.no_grad():
            phi_k.weight.add_(0.3 * torch.randn_like(phi_k.weight))
    factor = torch.randn(H)
    options = dict(feature_map=phi, window_factor=factor, key_feature_map=phi_k, linear_weight=linear_weight)
    expected = hybrid_attention_reference(q, k, v, window=W, padding_mask=mask, sinks=sinks, **options)
    with torch.no_grad():
        _, held = hybrid_attention_with_state(
            q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], window=W, sinks=sinks, padding_mask=mask[:, :prefill],
            output_final_state=True, **options,
        )
        general = held
        ring = ring_from_parts(held.window, held.sinks)
        state = tuple(x.clone() for x in held.linear)
        for i in range(prefill, n):
            t = slice(i, i + 1)
            out, ring = hybrid_ring_step_(q[:, :, t], k[:, :, t], v[:, :, t], mask[:, t], ring, state, **options)
            torch.testing.assert_close(out, expected[:, :, t], atol=1e-5, rtol=1e-5)
            _, general = hybrid_attention_with_state(
                q[:, :, t], k[:, :, t], v[:, :, t], window=W, sinks=sinks, padding_mask=mask[:, t], initial_state=general,
                output_final_state=True, **options,
            )
    window, sink_kv = ring_to_parts(ring)
    assert ring.start == (n - prefill) % W
    for got, want in zip(window, general.window):
        assert torch.equal(got, want)
    if sinks:
        for got, want in zip(sink_kv, general.sinks):
            assert torch.equal(got, want)
    else:
        assert sink_kv is None
    for got, want in zip(state, general.linear):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ring_round_trip_and_errors():
    q, k, v, mask = _sequence(12)
    with torch.no_grad():
        _, held = hybrid_attention_with_state(q, k, v, feature_map="elu", window=W, sinks=2, padding_mask=mask,
                                              output_final_state=True)
    ring = ring_from_parts(held.window, held.sinks)
    assert ring.keys.shape[2] == W + 2 and ring.window == W
    window, sinks = ring_to_parts(ring)
    assert all(torch.equal(a, b) for a, b in zip(window, held.window))
    assert all(torch.equal(a, b) for a, b in zip(sinks, held.sinks))
    empty = (held.sinks[0], held.sinks[1], torch.zeros_like(held.sinks[2]))
    with pytest.raises(ValueError, match="every sink slot is filled"):
        ring_from_parts(held.window, empty)
    state = tuple(x.clone() for x in held.linear)
    one = slice(0, 1)
    with pytest.raises(ValueError, match="one new token"):
        hybrid_ring_step_(q[:, :, :2], k[:, :, :2], v[:, :, :2], mask[:, :2], ring, state, feature_map="elu")
    with pytest.raises(ValueError, match="does not match"):
        hybrid_ring_step_(q[:1, :, one], k[:1, :, one], v[:1, :, one], mask[:1, one], ring, state, feature_map="elu")
    with pytest.raises(ValueError, match="contiguous float32"):
        hybrid_ring_step_(q[:, :, one], k[:, :, one], v[:, :, one], mask[:, one], ring,
                          (state[0].double(), state[1]), feature_map="elu")
    with pytest.raises(ValueError, match="no autograd"):
        hybrid_ring_step_(q[:, :, one].requires_grad_(), k[:, :, one], v[:, :, one], mask[:, one], ring, state,
                          feature_map="elu")


def test_a_changed_window_factor_is_seen_by_the_next_step():
    """The per-head mix is kept between steps only while the window factor is unchanged: after an in-place change
    (as an optimizer step or load_state_dict makes) the next step uses the new value."""
    q, k, v, mask = _sequence(14)
    factor = torch.zeros(H)
    with torch.no_grad():
        _, held = hybrid_attention_with_state(q[:, :, :12], k[:, :, :12], v[:, :, :12], feature_map="elu", window=W,
                                              padding_mask=mask[:, :12], window_factor=factor, output_final_state=True)
        t = slice(12, 13)
        ring, state = ring_from_parts(held.window, None), tuple(x.clone() for x in held.linear)
        hybrid_ring_step_(q[:, :, t], k[:, :, t], v[:, :, t], mask[:, t], ring, state, feature_map="elu",
                          window_factor=factor)
        factor.fill_(2.0)
        t = slice(13, 14)
        out, _ = hybrid_ring_step_(q[:, :, t], k[:, :, t], v[:, :, t], mask[:, t], ring._replace(start=1), state,
                                   feature_map="elu", window_factor=factor)
    expected = hybrid_attention_reference(q, k, v, feature_map="elu", window=W, padding_mask=mask,
                                          window_factor=torch.full((H,), 2.0))
    torch.testing.assert_close(out, expected[:, :, t], atol=1e-5, rtol=1e-5)
