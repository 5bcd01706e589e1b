"""The chunked O(N (C + W + sinks)) LoLCATs hybrid (`ops.hybrid.sliding_window_linear_attention`) against the quadratic
references (`reference.hybrid_attention_reference`, the old one-matrix op; `reference.naive_hybrid_attention`, the
written-out weights): outputs and gradients, attention sinks, separate q / k maps, both linear weights, queries at the
last positions, a carried state and sinks, padding, bf16; and its memory, measured as the sizes of the tensors it
allocates (forward and backward), grows linearly in N where the reference's grows quadratically."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_fastattn.ops.feature_maps import HedgehogFeatureMap, T2RFeatureMap
from hf_fastattn.ops.hybrid import empty_sinks, leave_window, sliding_window_linear_attention
from hf_fastattn.ops.reference import hybrid_attention_reference, naive_hybrid_attention

B, H, HKV, D = 2, 4, 2, 8


@pytest.fixture(autouse=True, params=["cpu-kernel", "torch-products"])
def cpu_products(request, monkeypatch):
    """Every test twice on the CPU: the linear part of a whole sequence through the C++ kernel of
    `kernels/chunk_linear` where it is available, and in torch chunk by chunk (what a CPU without AVX-512 runs)."""
    from hf_fastattn.kernels import chunk_linear

    if request.param == "torch-products":
        monkeypatch.setattr(chunk_linear, "supports", lambda *tensors: False)
    elif not chunk_linear.available():
        pytest.skip("the CPU kernel is not available here (no AVX-512 or no compiler)")
    return request.param


def _maps(kind: str, separate: bool, seed: int = 0):
    torch.manual_seed(seed)
    make = (lambda: HedgehogFeatureMap(H, D)) if kind == "hedgehog" else (lambda: T2RFeatureMap(H, D, 12))
    q_map = make()
    if not separate:
        return q_map, None
    k_map = make()
    with torch.no_grad():  # hedgehog starts at the identity: move the key map away from the query map
        k_map.weight.add_(0.3 * torch.randn_like(k_map.weight))
    return q_map, k_map


def _inputs(n, nq, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, n, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, n, D, generator=g).to(dtype)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, : min(3, n - 1)] = False  # left padding of row 1
    return q, k, v, mask


@pytest.mark.parametrize("n,nq", [(1, 1), (9, 9), (37, 37), (37, 5)], ids=lambda x: str(x))
@pytest.mark.parametrize("window", [1, 4, 50])
@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("chunk", [None, 4])
def test_chunked_equals_the_quadratic_references(n, nq, window, sinks, chunk):
    q, k, v, mask = _inputs(n, nq)
    factor = torch.randn(H)
    for separate, weight in itertools.product([False, True], ["1-gamma", "1"]):
        q_map, k_map = _maps("hedgehog", separate)
        kw = dict(feature_map=q_map, key_feature_map=k_map, window=window, window_factor=factor, padding_mask=mask,
                  sinks=sinks, linear_weight=weight, scaling=0.4)
        got = sliding_window_linear_attention(q, k, v, chunk_size=chunk, **kw)
        torch.testing.assert_close(got, hybrid_attention_reference(q, k, v, **kw), atol=1e-5, rtol=1e-5)
        if nq == n:
            torch.testing.assert_close(got, naive_hybrid_attention(q, k, v, **kw), atol=1e-5, rtol=1e-5)


def test_state_and_held_sinks_equal_the_reference():
    """Queries after a folded state and sink slots (what a decoder holds), some slots still empty."""
    q, k, v, mask = _inputs(12, 12, seed=3)
    q_map, k_map = _maps("t2r", True)
    state = (torch.rand(B, H, 12, D), torch.rand(B, H, 12))
    held = empty_sinks(k, v, 3)
    held = (held[0] + torch.randn_like(held[0]), held[1] + torch.randn_like(held[1]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    kw = dict(feature_map=q_map, key_feature_map=k_map, window=3, window_factor=torch.randn(H), padding_mask=mask,
              sinks=3, sink_kv=held, initial_state=state, linear_weight="1")
    got = sliding_window_linear_attention(q[:, :, 4:], k, v, chunk_size=3, **kw)
    torch.testing.assert_close(got, hybrid_attention_reference(q[:, :, 4:], k, v, **kw), atol=1e-5, rtol=1e-5)


def test_sinks_are_the_first_real_tokens_and_count_once():
    """With the window covering everything and gamma -> 1 the hybrid is causal softmax, sinks or not (a sink in the
    window is not counted twice); a left-padded row equals its unpadded self (the sinks are its first real tokens)."""
    q, k, v, _ = _inputs(20, 20)
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    kw = dict(feature_map="elu", window=64, window_factor=torch.full((H,), 40.0))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for sinks in (0, 2, 30):
        torch.testing.assert_close(sliding_window_linear_attention(q, k, v, sinks=sinks, **kw), sdpa, atol=1e-5, rtol=1e-5)
    pad = 5
    qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, pad, 0)) for x in (q, k, v))
    mask = torch.ones(B, 20 + pad, dtype=torch.bool)
    mask[:, :pad] = False
    kw = dict(feature_map="elu", window=3, sinks=2, window_factor=torch.randn(H))
    alone = sliding_window_linear_attention(q, k, v, **kw)
    padded = sliding_window_linear_attention(qp, kp, vp, padding_mask=mask, **kw)
    torch.testing.assert_close(padded[:, :, pad:], alone, atol=1e-5, rtol=1e-5)
    # and the sinks change the result (the test above is not vacuous)
    assert not torch.allclose(alone, sliding_window_linear_attention(q, k, v, **{**kw, "sinks": 0}), atol=1e-3)


@pytest.mark.parametrize("kind", ["hedgehog", "t2r"])
@pytest.mark.parametrize("weight", ["1-gamma", "1"])
def test_gradients_equal_the_reference(kind, weight):
    q_map, k_map = _maps(kind, True)
    q, k, v, mask = _inputs(23, 23, seed=5)
    factor = torch.randn(H)

    def run(fn):
        leaves = {"q": q.clone().requires_grad_(), "k": k.clone().requires_grad_(), "v": v.clone().requires_grad_(),
                  "factor": factor.clone().requires_grad_()}
        for m in (q_map, k_map):
            m.zero_grad()
        out = fn(leaves["q"], leaves["k"], leaves["v"], feature_map=q_map, key_feature_map=k_map, window=4,
                 window_factor=leaves["factor"], padding_mask=mask, sinks=2, linear_weight=weight)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: t.grad.clone() for name, t in leaves.items()}
        for prefix, m in (("q_map", q_map), ("k_map", k_map)):
            grads.update({f"{prefix}.{n}": p.grad.clone() for n, p in m.named_parameters()})
        return out.detach(), grads

    got, got_grads = run(lambda *a, **kw: sliding_window_linear_attention(*a, chunk_size=5, **kw))
    want, want_grads = run(naive_hybrid_attention)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert want_grads[name].abs().sum() > 0, name  # every input matters
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_inputs():
    q, k, v, mask = _inputs(40, 40, seed=2)
    q_map, _ = _maps("hedgehog", False)
    kw = dict(feature_map=q_map, window=8, sinks=4, padding_mask=mask)
    got = sliding_window_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert got.dtype == torch.bfloat16
    want = hybrid_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_leave_window_fills_sink_slots_in_order_then_folds():
    _, k, v, mask = _inputs(6, 6)
    q_map, _ = _maps("hedgehog", False)
    slots = empty_sinks(k, v, 2)
    (s, z), (sk, sv, smask) = leave_window(k, v, mask, feature_map=q_map, num_heads=H, state=None, sink_kv=slots)
    assert smask.all()
    assert torch.equal(sk[0], k[0, :, :2]) and torch.equal(sk[1], k[1, :, 3:5])  # row 1: padding, then its sinks
    from hf_fastattn.ops.hybrid import fold_window_state

    s_ref, z_ref = fold_window_state(k[:1, :, 2:], v[:1, :, 2:], feature_map=q_map, num_heads=H)
    torch.testing.assert_close(s[:1], s_ref)
    torch.testing.assert_close(z[:1], z_ref)


def test_bad_options_are_refused():
    q, k, v, _ = _inputs(5, 5)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        sliding_window_linear_attention(q, k, v, feature_map="elu", window=2, sinks=-1)
    with pytest.raises(ValueError, match=r"linear_weight must be one of \['1-gamma', '1'\]"):
        sliding_window_linear_attention(q, k, v, feature_map="elu", window=2, linear_weight="one")
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sliding_window_linear_attention(q, k, v, feature_map="elu", window=0)
    with pytest.raises(ValueError, match="queries must be the last positions"):
        sliding_window_linear_attention(q, k[:, :, :3], v[:, :, :3], feature_map="elu", window=2)


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of every tensor storage an op returns: the largest one, and their sum."""

    def __init__(self):
        super().__init__()
        self.largest, self.total = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and func not in _VIEWS:
                nbytes = t.untyped_storage().nbytes()
                self.largest, self.total = max(self.largest, nbytes), self.total + nbytes
        return out


_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.unfold.default,
          torch.ops.aten.transpose.int, torch.ops.aten.slice.Tensor, torch.ops.aten.expand.default,
          torch.ops.aten.unsqueeze.default, torch.ops.aten.select.int, torch.ops.aten.alias.default,
          torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.as_strided.default,
          torch.ops.aten.detach.default, torch.ops.aten.squeeze.dim, torch.ops.aten.reshape.default}


def _measure(fn, n, window=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, n, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 2, n, 16, generator=g, requires_grad=True)
    fmap = HedgehogFeatureMap(2, 16)
    with LargestAllocation() as mode:
        fn(q, k, v, feature_map=fmap, window=window, sinks=4).sum().backward()
    return mode.largest, mode.total


def test_memory_grows_linearly_in_n():
    """Forward and backward: the largest tensor and the sum of every tensor allocated double when N doubles (up to
    1.1x), and stay far below one N x N matrix; the quadratic reference's grow 4x (the measure can tell)."""
    sizes = [512, 1024, 2048]
    chunked = [_measure(sliding_window_linear_attention, n) for n in sizes]
    for (big0, sum0), (big1, sum1) in zip(chunked, chunked[1:]):
        assert big1 <= 2.1 * big0 and sum1 <= 2.1 * sum0, chunked
    assert chunked[-1][0] < 2 * 2048 * 2048 * 4 / 16  # a sixteenth of the [1, 2, N, N] fp32 weights
    quadratic = [_measure(hybrid_attention_reference, n) for n in sizes[:2]]
    assert quadratic[1][0] >= 3.9 * quadratic[0][0], quadratic
