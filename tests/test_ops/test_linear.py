"""linear_attention, chunk_linear_attention and recurrent_linear_step against the naive quadratic reference."""

import pytest
import torch
from torch import nn

from hf_fastattn.ops import chunk_linear_attention, linear_attention, recurrent_linear_step
from hf_fastattn.ops import linear as linear_module
from hf_fastattn.ops.feature_maps import T2RFeatureMap
from hf_fastattn.ops.reference import naive_feature_attention, naive_linear_attention, repeat_kv

from .helpers import assert_bf16_close, assert_fp16_close, assert_matches_reference, inputs, left_padding

LENGTHS = [1, 63, 500]


@pytest.fixture(autouse=True, params=["cpu-kernel", "torch-products"])
def cpu_products(request, monkeypatch):
    """Every test twice on the CPU: with the C++ kernel of `kernels/chunk_linear` where it is available, and with
    the causal products in torch (`_torch_chunk_products`, what a CPU without AVX-512 runs)."""
    from hf_fastattn.kernels import chunk_linear

    if request.param == "torch-products":
        monkeypatch.setattr(chunk_linear, "supports", lambda *tensors: False)
    elif not chunk_linear.available():
        pytest.skip("the CPU kernel is not available here (no AVX-512 or no compiler)")
    return request.param


class ScaledSoftplus(nn.Module):
    """A custom feature map with parameters: proves any nn.Module plugs in."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, 8) / d**0.5)

    def forward(self, x):
        return nn.functional.softplus(x @ self.w)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_matches_reference(n, causal, feature_map):
    q, k, v = inputs(2, 4, 2, n, 16)
    assert_matches_reference(
        lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=feature_map, backend="torch"),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=causal, feature_map=feature_map),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_linear_custom_feature_map_and_padding(causal, hkv):
    q, k, v = inputs(2, 4, hkv, 70, 16)
    fmap = ScaledSoftplus(16)
    mask = left_padding(2, 70, 23)
    assert_matches_reference(
        lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=fmap, padding_mask=mask),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=causal, feature_map=fmap, padding_mask=mask),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_chunk_sizes_agree(chunk_size):
    q, k, v = inputs(1, 2, 2, 130, 8, grad=False)
    out = linear_attention(q, k, v, causal=True, chunk_size=chunk_size)
    torch.testing.assert_close(out, naive_linear_attention(q, k, v, causal=True), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("n", [1, 63, 130])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_chunk_state_in_and_out(n, causal):
    qf, kf = torch.rand(2, 4, n, 8, requires_grad=True), torch.rand(2, 2, n, 8, requires_grad=True)
    v = torch.randn(2, 2, n, 6, requires_grad=True)
    s0 = torch.rand(2, 2, 8, 6, requires_grad=True)
    z0 = torch.rand(2, 2, 8, requires_grad=True)
    out, (s, z) = chunk_linear_attention(
        qf, kf, v, causal=causal, initial_state=(s0, z0), output_final_state=True, chunk_size=16
    )
    ref, (rs, rz) = naive_feature_attention(
        qf,
        repeat_kv(kf, 4),
        repeat_kv(v, 4),
        causal=causal,
        initial_state=(repeat_kv(s0, 4), repeat_kv(z0[..., None], 4)[..., 0]),
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, rs[:, ::2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, rz[:, ::2], atol=1e-4, rtol=1e-4)
    # gradients, the initial state's included
    loss = out.square().sum() + s.sum() + z.sum()
    grads = torch.autograd.grad(loss, (qf, kf, v, s0, z0))
    ref_loss = ref.square().sum() + rs[:, ::2].sum() + rz[:, ::2].sum()
    ref_grads = torch.autograd.grad(ref_loss, (qf, kf, v, s0, z0))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-3, rtol=1e-3)


def test_recurrent_steps_equal_chunked():
    qf, kf, v = torch.rand(1, 4, 40, 8), torch.rand(1, 2, 40, 8), torch.randn(1, 2, 40, 5)
    full, final = chunk_linear_attention(qf, kf, v, causal=True, output_final_state=True)
    state = (torch.zeros(1, 2, 8, 5), torch.zeros(1, 2, 8))
    outs = []
    for t in range(40):
        o, state = recurrent_linear_step(qf[:, :, t : t + 1], kf[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state[0], final[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state[1], final[1], atol=1e-4, rtol=1e-4)


def test_prefill_then_continue_equals_whole():
    """Chunked prefill handing its state to a second chunked call == one call over everything."""
    qf, kf, v = torch.rand(1, 2, 90, 8), torch.rand(1, 2, 90, 8), torch.randn(1, 2, 90, 4)
    whole, _ = chunk_linear_attention(qf, kf, v, causal=True)
    a, state = chunk_linear_attention(
        qf[:, :, :50], kf[:, :, :50], v[:, :, :50], causal=True, output_final_state=True
    )
    b, _ = chunk_linear_attention(
        qf[:, :, 50:], kf[:, :, 50:], v[:, :, 50:], causal=True, initial_state=state
    )
    torch.testing.assert_close(torch.cat([a, b], 2), whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bf16_error_within_twice_reference_error(causal):
    q, k, v = inputs(1, 2, 2, 200, 16, grad=False)
    assert_bf16_close(
        lambda q, k, v: linear_attention(q, k, v, causal=causal),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=causal),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_fp16_error_within_twice_reference_error(feature_map, causal):
    q, k, v = inputs(2, 4, 2, 200, 16, grad=False)
    mask = left_padding(2, 200, 37)
    assert_fp16_close(
        lambda q, k, v: linear_attention(q, k, v, causal=causal, feature_map=feature_map, padding_mask=mask),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=causal, feature_map=feature_map, padding_mask=mask),
        q,
        k,
        v,
    )


def test_fp16_and_empty_rows_are_finite():
    q, k, v = inputs(2, 2, 2, 64, 16, dtype=torch.float16, grad=False)
    out = linear_attention(q, k, v, causal=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # relu of all-negative keys: every weight is 0 -> the output is 0, not NaN
    out = linear_attention(q, -k.abs() - 1, v, causal=True, feature_map="relu")
    assert torch.isfinite(out).all() and out.abs().max() == 0
    # a query whose only keys are padding
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, :10] = False
    out = linear_attention(q.float(), k.float(), v.float(), causal=True, padding_mask=mask)
    assert torch.isfinite(out).all() and out[1, :, :10].abs().max() == 0


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_causality(feature_map):
    """Changing tokens from position 50 on (q, k and v) leaves outputs 0..49 bit-identical, and changes 50.."""
    q, k, v = inputs(1, 4, 2, 80, 8, grad=False)
    out = linear_attention(q, k, v, causal=True, feature_map=feature_map, chunk_size=16)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 50:] *= -1
    k2[:, :, 50:] += 3
    v2[:, :, 50:] -= 2
    out2 = linear_attention(q2, k2, v2, causal=True, feature_map=feature_map, chunk_size=16)
    torch.testing.assert_close(out[:, :, :50], out2[:, :, :50], atol=0, rtol=0)
    assert not torch.allclose(out[:, :, 50:], out2[:, :, 50:])


def test_bad_input_errors():
    q, k, v = inputs(1, 4, 3, 8, 8, grad=False)
    with pytest.raises(ValueError, match="divide"):
        linear_attention(q, k, v, causal=True)
    q, k, v = inputs(1, 2, 2, 8, 8, grad=False)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        linear_attention(q, k, v, causal=True, feature_map="softmax")
    with pytest.raises(ValueError, match="same length"):
        linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, causal=True, backend="cuda")
    with pytest.raises(ValueError, match="one token"):
        recurrent_linear_step(q, k, v, (torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_many_segments_equal_reference(monkeypatch, grad):
    """Long inputs go through the chunked form in segments (bounded memory); with a small budget the segments are
    4 chunks of 16 here: 150 tokens make 3 segments, the last one padded, each starting from the state the previous
    one left, with a learned per-head map (GQA), padding and an initial state."""
    budget = 50_000
    monkeypatch.setattr(linear_module, "_SEGMENT_BUDGET", budget)
    monkeypatch.setattr(linear_module, "_SEGMENT_BUDGET_GRAD", budget)
    segments = []
    real = linear_module._causal_segment

    def spy(qf, *args):
        segments.append(qf.shape[3])
        return real(qf, *args)

    monkeypatch.setattr(linear_module, "_causal_segment", spy)
    torch.manual_seed(0)
    fmap = T2RFeatureMap(4, 16, 16)
    q, k, v = inputs(2, 4, 2, 150, 16, grad=grad)
    mask = left_padding(2, 150, 70)  # row 1's padding spans the first segment and part of the second
    s0, z0 = torch.rand(2, 4, 16, 16), torch.rand(2, 4, 16)

    def ours(q, k, v):
        k, v = repeat_kv(k, 4), repeat_kv(v, 4)  # the per-head map has one set of weights per query head
        return linear_module.causal_linear_attention(
            q, k, v, feature_map=fmap, key_mask=mask, initial_state=(s0, z0), output_final_state=True, chunk_size=16
        )

    out, (s, z) = ours(q, k, v)
    assert segments == [64, 64, 32]
    qf, kf = fmap(q), fmap(repeat_kv(k, 4)) * mask[:, None, :, None]
    ref, (rs, rz) = naive_feature_attention(qf, kf, repeat_kv(v, 4), causal=True, initial_state=(s0, z0))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(s, rs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, rz, atol=1e-4, rtol=1e-4)
    if grad:
        assert_matches_reference(
            lambda q, k, v: ours(q, k, v)[0],
            lambda q, k, v: naive_feature_attention(
                fmap(q), fmap(repeat_kv(k, 4)) * mask[:, None, :, None], repeat_kv(v, 4), causal=True,
                initial_state=(s0, z0),
            )[0],
            q,
            k,
            v,
        )
        assert fmap.weight.grad is not None and fmap.weight.grad.abs().max() > 0


def _spy_products(monkeypatch):
    from hf_fastattn.ops import linear_cpu  # the CPU fast path's home

    calls = []
    real, real_normalized = linear_cpu._chunk_products, linear_cpu._normalized_products

    def spy(*args, **kwargs):
        calls.append(kwargs.get("reverse", False))
        return real(*args, **kwargs)

    def spy_normalized(*args, **kwargs):  # the forward's product, however computed
        calls.append("normalized")
        with monkeypatch.context() as quiet:
            quiet.setattr(linear_cpu, "_chunk_products", real)
            return real_normalized(*args, **kwargs)

    monkeypatch.setattr(linear_cpu, "_chunk_products", spy)
    monkeypatch.setattr(linear_cpu, "_normalized_products", spy_normalized)
    return calls


@pytest.mark.parametrize("n", [1, 63, 65, 600])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_fast_path_forward_and_backward(monkeypatch, n, hkv, feature_map):
    """The CPU fast path (`_chunk_products`, chunks of 64, segments of 512: 600 tokens make two segments, the last
    chunk partial) with left padding: outputs without autograd, and outputs and gradients through the custom
    autograd Function (forward: one causal product; backward: one causal and two reverse products)."""
    calls = _spy_products(monkeypatch)
    mask = left_padding(2, n, n // 3)
    q, k, v = inputs(2, 4, hkv, n, 16)
    with torch.no_grad():
        out = linear_attention(q, k, v, causal=True, feature_map=feature_map, padding_mask=mask)
    ref = naive_linear_attention(q, k, v, causal=True, feature_map=feature_map, padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    assert calls == [False]
    calls.clear()
    assert_matches_reference(
        lambda q, k, v: linear_attention(q, k, v, causal=True, feature_map=feature_map, padding_mask=mask),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=True, feature_map=feature_map, padding_mask=mask),
        q,
        k,
        v,
    )
    assert calls == ["normalized", False, True, True]


@pytest.mark.parametrize("n", [1, 40, 300])
def test_fast_path_state_in_and_out(n):
    """Without autograd, an initial state and the final state go through the fast path (GQA: the state has the
    K/V heads), equal to the naive reference."""
    qf, kf = torch.rand(2, 4, n, 8), torch.rand(2, 2, n, 8)
    v = torch.randn(2, 2, n, 6)
    s0, z0 = torch.rand(2, 2, 8, 6), torch.rand(2, 2, 8)
    with torch.no_grad():
        out, (s, z) = chunk_linear_attention(qf, kf, v, causal=True, initial_state=(s0, z0), output_final_state=True)
    ref, (rs, rz) = naive_feature_attention(
        qf, repeat_kv(kf, 4), repeat_kv(v, 4), causal=True,
        initial_state=(repeat_kv(s0, 4), repeat_kv(z0[..., None], 4)[..., 0]),
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, rs[:, ::2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, rz[:, ::2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "anti-causal"])
def test_chunk_products_against_masked_product(reverse):
    """out = mask(a b^T) c with the lower (upper when `reverse`) triangle, lengths not multiples of the chunk, several
    segments, and a column of ones giving the row sums."""
    a, b, c = torch.rand(3, 70, 5), torch.rand(3, 70, 5), torch.randn(3, 70, 4)
    out, state = linear_module._chunk_products(a, b, c, chunk=8, segment=24, reverse=reverse, ones=True)
    w = a @ b.transpose(1, 2)
    w = w.triu() if reverse else w.tril()
    torch.testing.assert_close(out, torch.cat([w @ c, w.sum(-1, keepdim=True)], -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[..., :4], b.transpose(1, 2) @ c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[..., 4], b.sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 255, 600])
def test_bidirectional_inference_matches_reference(n):
    """Bidirectional without autograd (segment by segment: state, then outputs), GQA, padding, and a per-head learned
    map (frozen weights: no autograd needed)."""
    mask = left_padding(2, n, n // 4)
    fmap = T2RFeatureMap(4, 16, 16).requires_grad_(False)
    for feature_map, hkv in (("elu", 2), (fmap, 4)):  # the reference maps k before repeating it: MHA for per-head
        q, k, v = inputs(2, 4, hkv, n, 16, grad=False)
        out = linear_attention(q, k, v, causal=False, feature_map=feature_map, padding_mask=mask)
        ref = naive_linear_attention(q, k, v, causal=False, feature_map=feature_map, padding_mask=mask)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
