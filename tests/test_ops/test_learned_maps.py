"""Gradients of the learned feature maps (T2R, Hedgehog) through linear attention, and of the LoLCATs hybrid's
per-head mix, against the naive quadratic references (which differentiate the N x N weights directly)."""

import pytest
import torch

from hf_fastattn.ops import linear_attention
from hf_fastattn.ops.feature_maps import HedgehogFeatureMap, T2RFeatureMap
from hf_fastattn.ops.hybrid import sliding_window_linear_attention
from hf_fastattn.ops.reference import naive_hybrid_attention, naive_linear_attention, repeat_kv

from .helpers import inputs, left_padding

H, HKV, D = 4, 2, 8


def learned_map(kind):
    torch.manual_seed(3)
    fmap = T2RFeatureMap(H, D, 12) if kind == "t2r" else HedgehogFeatureMap(H, D)
    with torch.no_grad():  # away from the init (Hedgehog starts at the identity, with zero bias)
        for p in fmap.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return fmap


def grads(out, tensors, seed=1):
    """Grads of a fixed random projection of `out`; zeros for tensors it does not use."""
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad((out * cot).sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, tensors)]


def assert_grads_close(got, want, names):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-3, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind", ["t2r", "hedgehog"])
def test_learned_map_gradients_match_reference(kind, causal):
    """Grads of q, k, v and of the map's weights and biases (GQA: the per-head map sees the K/V heads repeated)."""
    fmap = learned_map(kind)
    q, k, v = inputs(2, H, HKV, 90, D)
    mask = left_padding(2, 90, 17)
    params = [fmap.weight, fmap.bias]
    out = linear_attention(q, k, v, causal=causal, feature_map=fmap, padding_mask=mask, chunk_size=16)
    got = grads(out, [q, k, v, *params])
    ref = naive_linear_attention(q, repeat_kv(k, H), repeat_kv(v, H), causal=causal, feature_map=fmap, padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    want = grads(ref, [q, k, v, *params])
    assert all(g.abs().max() > 0 for g in want[3:])  # the maps' parameters really receive a gradient
    assert_grads_close(got, want, ["q", "k", "v", "weight", "bias"])


@pytest.mark.parametrize("kind", ["t2r", "hedgehog"])
@pytest.mark.parametrize("window", [1, 5, 100], ids=lambda w: f"window{w}")
def test_hybrid_mix_and_map_gradients_match_reference(kind, window):
    """The hybrid's output and the grads of q, k, v, the per-head mix (window_factor) and the map's parameters equal
    the one-matrix reference; window 100 > N: softmax only (the mix then still scales nothing but the window)."""
    fmap = learned_map(kind)
    q, k, v = inputs(2, H, HKV, 40, D)
    factor = torch.randn(H, requires_grad=True)
    mask = left_padding(2, 40, 9)
    tensors = [q, k, v, factor, fmap.weight, fmap.bias]
    kw = dict(feature_map=fmap, window=window, window_factor=factor, scaling=0.4, padding_mask=mask)
    out = sliding_window_linear_attention(q, k, v, **kw)
    ref = naive_hybrid_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    got, want = grads(out, tensors), grads(ref, tensors, seed=1)
    if window < 40:  # both parts present: the mix matters, and the map's parameters get a gradient
        assert want[3].abs().min() > 0 and want[4].abs().max() > 0
    assert_grads_close(got, want, ["q", "k", "v", "window_factor", "weight", "bias"])


def test_hybrid_reference_differs_from_plain_linear_and_softmax():
    """The reference is not degenerate: it is neither plain linear attention nor a softmax over the window."""
    fmap = learned_map("t2r")
    q, k, v = inputs(1, H, H, 30, D, grad=False)
    hybrid = naive_hybrid_attention(q, k, v, feature_map=fmap, window=4)
    assert not torch.allclose(hybrid, naive_linear_attention(q, k, v, causal=True, feature_map=fmap), atol=1e-3)
    assert not torch.allclose(hybrid, naive_hybrid_attention(q, k, v, feature_map=fmap, window=30), atol=1e-3)
