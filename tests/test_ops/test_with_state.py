"""Each operator family's state-in / state-out entry point (`*_attention_with_state`, fla's signature): a sequence fed
in pieces, the state of each piece passed to the next (a multi-token piece, a single token that takes the recurrent
step, another piece), gives the naive quadratic reference's output on the whole sequence, with GQA and left padding;
the final state equals the reference's (linear, fast); without a state the entry point equals the output-only
function bit for bit."""

from __future__ import annotations

import pytest
import torch

from hf_fastattn.ops.fast import fast_attention, fast_attention_with_state
from hf_fastattn.ops.feature_maps import EluFeatureMap, FastmaxFeatureMap
from hf_fastattn.ops.hybrid import hybrid_attention_with_state, sliding_window_linear_attention
from hf_fastattn.ops.linear import linear_attention, linear_attention_with_state
from hf_fastattn.ops.reference import (
    fast_normalize,
    naive_fast_attention,
    naive_feature_attention,
    naive_hybrid_attention,
    naive_linear_attention,
    naive_sparse_attention,
    repeat_kv,
)
from hf_fastattn.ops.sparse import sparse_attention, sparse_attention_with_state

from .helpers import inputs, left_padding

B, H, HKV, N, D = 2, 4, 2, 70, 16
PIECES = [(0, 37), (37, 38), (38, 70)]  # several tokens, one token (the recurrent step), the rest
TOL = dict(atol=2e-5, rtol=2e-4)


def _data(seed=0):
    torch.manual_seed(seed)
    q, k, v = inputs(B, H, HKV, N, D, grad=False)
    return q, k, v, left_padding(B, N, 20)


def _in_pieces(fn, q, k, v, mask):
    """Outputs of `fn(q, k, v, mask, state) -> (out, state)` over PIECES, concatenated, and the last state."""
    outs, state = [], None
    for start, end in PIECES:
        piece = (x[:, :, start:end] for x in (q, k, v))
        out, state = fn(*piece, mask[:, start:end], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def test_linear_in_pieces_equals_the_reference_and_its_state():
    q, k, v, mask = _data()
    steps = []

    def piece(q, k, v, m, state):
        steps.append(q.shape[2])
        return linear_attention_with_state(
            q, k, v, causal=True, feature_map="elu", padding_mask=m, initial_state=state, output_final_state=True
        )

    out, (s, z) = _in_pieces(piece, q, k, v, mask)
    ref = naive_linear_attention(q, k, v, causal=True, feature_map="elu", padding_mask=mask)
    torch.testing.assert_close(out, ref, **TOL)
    fmap = EluFeatureMap()
    _, (rs, rz) = naive_feature_attention(
        fmap(q), fmap(repeat_kv(k, H)) * mask[:, None, :, None], repeat_kv(v, H), causal=True
    )
    # the state has the K/V heads; the reference's repeated heads of a group are equal
    torch.testing.assert_close(s, rs[:, :: H // HKV], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, rz[:, :: H // HKV], atol=1e-4, rtol=1e-4)
    assert steps == [37, 1, 32]


def test_linear_recurrent_step_is_taken_for_one_token_with_a_state(monkeypatch):
    from hf_fastattn.ops import linear as linear_ops

    calls = []
    real = linear_ops._recurrent_step
    monkeypatch.setattr(linear_ops, "_recurrent_step", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    q, k, v, mask = _data()
    _in_pieces(
        lambda q, k, v, m, s: linear_attention_with_state(
            q, k, v, padding_mask=m, initial_state=s, output_final_state=True
        ),
        q,
        k,
        v,
        mask,
    )
    assert calls == [1]
    with pytest.raises(ValueError, match="decode=True runs the recurrent step"):
        linear_attention_with_state(q, k, v, decode=True)


def test_linear_bidirectional_with_an_initial_state_sees_the_earlier_keys():
    q, k, v, mask = _data()
    _, state = linear_attention_with_state(
        q[:, :, :30], k[:, :, :30], v[:, :, :30], causal=False, padding_mask=mask[:, :30], output_final_state=True
    )
    out, _ = linear_attention_with_state(
        q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], causal=False, padding_mask=mask[:, 30:], initial_state=state
    )
    ref = naive_linear_attention(q[:, :, 30:], k, v, causal=False, padding_mask=mask)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize(
    "order,temperature,path",
    [(1, 1.0, "torch"), (2, 0.7, "cpu-kernel"), (2, 0.7, "torch")],
    ids=["order1", "order2-cpu-kernel", "order2-torch"],
)
def test_fast_in_pieces_equals_the_reference_and_its_state(monkeypatch, order, temperature, path):
    """Order 2's pieces longer than one token run on the C++ kernel of `kernels/fast2_causal` where it is available
    (the state converted to and from the kernel's), or in torch (what a CPU without AVX-512 runs)."""
    from hf_fastattn.kernels import fast2_causal

    if path == "torch":
        monkeypatch.setattr(fast2_causal, "supports", lambda *tensors: False)
    elif not fast2_causal.available():
        pytest.skip("the CPU kernel is not available here (no AVX-512 or no compiler)")
    q, k, v, mask = _data(1)
    out, (s, z) = _in_pieces(
        lambda q, k, v, m, state: fast_attention_with_state(
            q,
            k,
            v,
            causal=True,
            order=order,
            temperature=temperature,
            padding_mask=m,
            initial_state=state,
            output_final_state=True,
        ),
        q,
        k,
        v,
        mask,
    )
    ref = naive_fast_attention(q, k, v, causal=True, order=order, temperature=temperature, padding_mask=mask)
    torch.testing.assert_close(out, ref, **TOL)
    fmap = FastmaxFeatureMap(order, temperature)
    kf = fmap(fast_normalize(repeat_kv(k, H))) * mask[:, None, :, None]
    _, (rs, rz) = naive_feature_attention(fmap(fast_normalize(q)), kf, repeat_kv(v, H), causal=True)
    torch.testing.assert_close(s, rs[:, :: H // HKV], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, rz[:, :: H // HKV], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_in_pieces_equals_the_reference(pattern):
    q, k, v, mask = _data(2)
    kw = dict(causal=True, pattern=pattern, stride=8, local=4 if pattern == "strided" else None, summary=2)
    out, (keys, values, held) = _in_pieces(
        lambda q, k, v, m, state: sparse_attention_with_state(
            q, k, v, **kw, padding_mask=m, initial_state=state, output_final_state=True
        ),
        q,
        k,
        v,
        mask,
    )
    ref = naive_sparse_attention(q, k, v, **kw, padding_mask=mask)
    real = mask[:, :, None, None].transpose(1, 2)  # padded query rows differ (no real key): compare real rows only
    torch.testing.assert_close(out * real, ref * real, **TOL)
    assert torch.equal(keys, k) and torch.equal(values, v) and torch.equal(held, mask)


@pytest.mark.parametrize("sinks", [0, 2])
def test_hybrid_in_pieces_equals_the_reference(sinks):
    q, k, v, mask = _data(3)
    torch.manual_seed(3)
    factor = torch.randn(H)
    kw = dict(feature_map="elu", window=8, window_factor=factor, sinks=sinks)
    out, state = _in_pieces(
        lambda q, k, v, m, state: hybrid_attention_with_state(
            q, k, v, **kw, padding_mask=m, initial_state=state, output_final_state=True
        ),
        q,
        k,
        v,
        mask,
    )
    ref = naive_hybrid_attention(q, k, v, **kw, padding_mask=mask)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, **TOL)
    assert state.window[0].shape[2] == 8 and torch.equal(state.window[0], k[:, :, -8:])
    assert (state.sinks is None) == (sinks == 0)


def test_without_a_state_the_entry_points_equal_the_output_only_functions():
    q, k, v, mask = _data(4)
    pairs = [
        (
            linear_attention_with_state(q, k, v, causal=True, padding_mask=mask),
            linear_attention(q, k, v, causal=True, padding_mask=mask),
        ),
        (
            fast_attention_with_state(q, k, v, causal=True, padding_mask=mask),
            fast_attention(q, k, v, causal=True, padding_mask=mask),
        ),
        (
            sparse_attention_with_state(q, k, v, causal=True, stride=8, padding_mask=mask),
            sparse_attention(q, k, v, causal=True, stride=8, padding_mask=mask),
        ),
        (
            hybrid_attention_with_state(q, k, v, feature_map="elu", window=8, padding_mask=mask),
            sliding_window_linear_attention(q, k, v, feature_map="elu", window=8, padding_mask=mask),
        ),
    ]
    for (out, state), expected in pairs:
        assert state is None and torch.equal(out, expected)


@pytest.mark.parametrize("groups", [1, 3])
def test_in_place_step_equals_the_step_that_makes_a_new_state(groups):
    """`recurrent_linear_step_` (decoding on a cache's own state) gives `recurrent_linear_step`'s output and leaves
    in the state tensors the new state that one returns; over several steps it follows the quadratic reference."""
    from hf_fastattn.ops.linear import recurrent_linear_step, recurrent_linear_step_

    torch.manual_seed(0)
    b, hkv, d, steps = 2, 2, 8, 5
    phi = EluFeatureMap()
    q, k, v = torch.randn(b, hkv * groups, steps, d), torch.randn(b, hkv, steps, d), torch.randn(b, hkv, steps, d)
    s0, z0 = torch.rand(b, hkv, d, d), torch.rand(b, hkv, d)
    state = (s0.clone(), z0.clone())
    kept = state
    for t in range(steps):
        qf, kf, vt = phi(q[:, :, t : t + 1]), phi(k[:, :, t : t + 1]), v[:, :, t : t + 1]
        expected, new_state = recurrent_linear_step(qf, kf, vt, state, backend="torch")
        out = recurrent_linear_step_(qf, kf, vt, kept)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(kept[0], new_state[0])
        torch.testing.assert_close(kept[1], new_state[1])
        state = new_state
    # the same outputs as attending to every key so far with the initial state in front, recomputed directly
    qf, kf = phi(q[:, :, -1:]), phi(k).repeat_interleave(groups, 1)
    vr = v.repeat_interleave(groups, 1)
    s_full = s0.repeat_interleave(groups, 1) + kf.transpose(-1, -2) @ vr
    z_full = z0.repeat_interleave(groups, 1) + kf.sum(2)
    direct = (qf @ s_full) / (qf @ z_full.unsqueeze(-1))
    torch.testing.assert_close(out, direct)


def test_in_place_step_refuses_what_it_cannot_update():
    from hf_fastattn.ops.linear import recurrent_linear_step_

    qf, kf, v = torch.rand(1, 2, 1, 4), torch.rand(1, 2, 1, 4), torch.rand(1, 2, 1, 4)
    state = (torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4))
    with pytest.raises(ValueError, match="one token"):
        recurrent_linear_step_(torch.rand(1, 2, 3, 4), kf, v, state)
    with pytest.raises(ValueError, match="contiguous float32"):
        recurrent_linear_step_(qf, kf, v, (state[0].transpose(-1, -2), state[1]))
    with pytest.raises(ValueError, match="contiguous float32"):
        recurrent_linear_step_(qf, kf, v, (state[0].double(), state[1].double()))
    with pytest.raises(ValueError, match="the state has shapes"):
        recurrent_linear_step_(qf, kf, v, (torch.rand(1, 2, 4, 3), state[1]))
    with pytest.raises(ValueError, match="autograd"):
        recurrent_linear_step_(qf.requires_grad_(), kf, v, state)
