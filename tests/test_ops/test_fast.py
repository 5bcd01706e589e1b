"""fast_attention (FAST fastmax) against the naive quadratic reference."""

import math

import pytest
import torch

from hf_fastattn.ops import FastmaxFeatureMap, fast_attention
from hf_fastattn.ops import linear as linear_module
from hf_fastattn.ops.reference import fast_normalize, naive_fast_attention

from .helpers import assert_bf16_close, assert_fp16_close, assert_matches_reference, inputs, left_padding


@pytest.mark.parametrize("n", [1, 63, 500])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "order,temperature",
    [(1, 1.0), (2, 1.0), (2, 0.5), (1, 3.0)],
    ids=["order1-T1", "order2-T1", "order2-T0.5", "order1-T3"],
)
def test_fast_matches_reference(n, causal, order, temperature):
    q, k, v = inputs(2, 4, 2, n, 16)
    assert_matches_reference(
        lambda q, k, v: fast_attention(q, k, v, causal=causal, order=order, temperature=temperature),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=causal, order=order, temperature=temperature),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("order", [1, 2])
def test_fast_head_dim_64(order, causal, monkeypatch):
    """A real head size. Order 2 then has F = 1 + 64 + 64 * 65 / 2 = 2145 > 256 features: the causal form takes
    chunks of 256 one at a time (a loop whose single state stays in cache); 300 tokens make two chunks, the second
    padded. Order 1 (F = 65) is plain linear attention with fastmax's features: the linear fast path
    (`_chunk_products` under a custom autograd Function), no segment of the general form."""
    segments = []
    real = linear_module._causal_segment

    def spy(qf, *args):
        segments.append(qf.shape[3])
        return real(qf, *args)

    monkeypatch.setattr(linear_module, "_causal_segment", spy)
    q, k, v = inputs(1, 4, 2, 300, 64)
    mask = left_padding(1, 300, 20)
    assert_matches_reference(
        lambda q, k, v: fast_attention(q, k, v, causal=causal, order=order, temperature=1.5, padding_mask=mask),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=causal, order=order, temperature=1.5, padding_mask=mask),
        q,
        k,
        v,
    )
    if causal:
        assert segments == ([256, 256] if order == 2 else [])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fast_padding(causal):
    q, k, v = inputs(2, 2, 2, 90, 8)
    mask = left_padding(2, 90, 31)
    assert_matches_reference(
        lambda q, k, v: fast_attention(q, k, v, causal=causal, padding_mask=mask),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=causal, padding_mask=mask),
        q,
        k,
        v,
    )


@pytest.fixture(params=["gather", "slices"])
def quadratic_form(request, monkeypatch):
    """Both ways of building the order-2 features: one gather (few rows: decoding) and D slices (many rows)."""
    from hf_fastattn.ops import feature_maps

    monkeypatch.setattr(feature_maps, "GATHER_ROWS", 10**9 if request.param == "gather" else -1)
    return request.param


@pytest.mark.parametrize("order", [1, 2])
def test_fastmax_features_factorize_the_weight(order, quadratic_form):
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    fmap = FastmaxFeatureMap(order, temperature=1.7)
    s = (x * y).sum(-1) / 1.7
    expected = 1 + s + (s * s / 2 if order == 2 else 0)
    torch.testing.assert_close((fmap(x) * fmap(y)).sum(-1), expected)
    assert fmap(x).shape[-1] == fmap.feature_dim(7) == (1 + 7 + (28 if order == 2 else 0))


def test_fastmax_feature_gradient(quadratic_form):
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(FastmaxFeatureMap(2, 1.3), (x,))


def test_fastmax_feature_forms_agree_bitwise():
    """The gather form (a decoding step's few rows) and the slice form give the same features, bit for bit in fp32 /
    fp64 (the same products, the same diagonal scale); which one runs depends only on the row count."""
    from hf_fastattn.ops import feature_maps

    fmap = FastmaxFeatureMap(2, 1.0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1, 8, 3, 64, dtype=dtype)
        gathered = fmap(x)
        before = feature_maps.GATHER_ROWS
        try:
            feature_maps.GATHER_ROWS = -1
            sliced = fmap(x)
        finally:
            feature_maps.GATHER_ROWS = before
        assert torch.equal(gathered, sliced)


@pytest.mark.parametrize("order", [1, 2])
def test_causality(order):
    """Changing q, k and v from position 40 on leaves outputs 0..39 unchanged (chunk boundary inside the change)."""
    q, k, v = inputs(1, 4, 2, 70, 8, grad=False)
    out = fast_attention(q, k, v, causal=True, order=order, chunk_size=16)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 40:] += 1
    k2[:, :, 40:] = torch.randn_like(k2[:, :, 40:]) * 5
    v2[:, :, 40:] *= -3
    out2 = fast_attention(q2, k2, v2, causal=True, order=order, chunk_size=16)
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], atol=0, rtol=0)
    assert not torch.allclose(out2[:, :, 40:], out[:, :, 40:])


def test_normalization_is_per_token():
    """Later tokens must not rescale earlier outputs (the paper's whole-sequence max norm would)."""
    q, k, v = inputs(1, 2, 2, 40, 8, grad=False)
    out = fast_attention(q, k, v, causal=True)
    k2 = k.clone()
    k2[:, :, -1] *= 100
    torch.testing.assert_close(fast_attention(q, k2, v, causal=True)[:, :, :-1], out[:, :, :-1])
    n = fast_normalize(torch.randn(4, 8))
    torch.testing.assert_close(n.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("order", [1, 2])
def test_bf16(order):
    q, k, v = inputs(1, 2, 2, 150, 16, grad=False)
    assert_bf16_close(
        lambda q, k, v: fast_attention(q, k, v, causal=True, order=order),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=True, order=order),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_order1_opposite_vectors_no_nan(causal):
    """q_hat = -k_hat with one key: weight 1 + s = 0, the denominator must not produce NaN (nor its gradient)."""
    q = torch.randn(1, 1, 1, 8, requires_grad=True)
    k = (-q).detach().requires_grad_()
    v = torch.randn(1, 1, 1, 8, requires_grad=True)
    out = fast_attention(q, k, v, causal=causal, order=1)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fp16_and_fully_padded_rows_are_finite(order, causal):
    q, k, v = inputs(2, 2, 2, 64, 16, grad=False, scale=30.0)
    mask = left_padding(2, 64, 64 if not causal else 10)  # bidirectional: every key of row 1 is padding
    out = fast_attention(q.half(), k.half(), v.half(), causal=causal, order=order, padding_mask=mask)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    empty = out[1, :, :10] if causal else out[1]
    assert empty.abs().max() == 0
    # and the values: within twice the fp16 error of the reference itself
    assert_fp16_close(
        lambda q, k, v: fast_attention(q, k, v, causal=causal, order=order, padding_mask=mask),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=causal, order=order, padding_mask=mask),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("order", [1, 2])
def test_fp16_head_dim_64(order):
    q, k, v = inputs(1, 2, 2, 300, 64, grad=False)
    assert_fp16_close(
        lambda q, k, v: fast_attention(q, k, v, causal=True, order=order),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=True, order=order),
        q,
        k,
        v,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(order=3), "order must be 1 or 2"),
        (dict(temperature=0.0), "temperature must be a positive number"),
        (dict(order=1, temperature=0.5), "order 1 needs temperature >= 1"),
    ],
    ids=["order3", "temperature0", "order1-low-temperature"],
)
def test_bad_options(kwargs, match):
    q, k, v = inputs(1, 1, 1, 4, 4, grad=False)
    with pytest.raises(ValueError, match=match):
        fast_attention(q, k, v, causal=True, **kwargs)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_bad_shapes(causal):
    q, k, v = inputs(1, 4, 3, 8, 8, grad=False)
    with pytest.raises(ValueError, match="divide the query heads"):
        fast_attention(q, k, v, causal=causal)
    q, k, v = inputs(1, 2, 2, 8, 8, grad=False)
    with pytest.raises(ValueError, match="same length"):
        fast_attention(q, k[:, :, :6], v[:, :, :6], causal=causal)


def test_weights_are_taylor_of_exp():
    """Sanity of the reference itself: f approximates exp on [-1, 1] within the Taylor remainder."""
    s = torch.linspace(-1, 1, 11)
    from hf_fastattn.ops.reference import fastmax_weight

    assert (fastmax_weight(s, 2) - s.exp()).abs().max() <= math.e / 6 + 1e-6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fullgraph_compile_equals_eager(causal):
    """`torch.compile(fullgraph=True)` traces FAST order 2 (its feature construction included) with no graph break,
    forward and backward, and gives eager's numbers."""
    torch.manual_seed(0)
    q, k, v = inputs(1, 2, 2, 40, 8)

    def f(q, k, v):
        return fast_attention(q, k, v, causal=causal, order=2, backend="torch")

    eager = f(q, k, v)
    grads = torch.autograd.grad(eager.square().sum(), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(compiled.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 63, 129, 260])
@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("path", ["cpu-kernel", "torch"])
def test_order2_inference_path_matches_reference(monkeypatch, n, hkv, temperature, path):
    """Causal order 2 without autograd takes `_causal_order2_inference` (chunks of 128: partial last chunk, several
    chunks sharing one feature buffer, D-dimensional denominators, the transposed features with f's coefficients on
    the query side): equal to the naive reference, with left padding and D = 32; through the C++ kernel of
    `kernels/fast2_causal` where it is available and through the torch loop (what a CPU without AVX-512 runs)."""
    from hf_fastattn.kernels import fast2_causal
    from hf_fastattn.ops import fast as fast_module

    if path == "torch":
        monkeypatch.setattr(fast2_causal, "supports", lambda *tensors: False)
    elif not fast2_causal.available():
        pytest.skip("the CPU kernel is not available here (no AVX-512 or no compiler)")
    calls = []
    real = fast_module._causal_order2_inference
    monkeypatch.setattr(fast_module, "_causal_order2_inference", lambda *a: calls.append(1) or real(*a))
    q, k, v = inputs(2, 4, hkv, n, 32, grad=False)
    mask = left_padding(2, n, n // 3)
    out = fast_attention(q, k, v, causal=True, order=2, temperature=temperature, padding_mask=mask)
    ref = naive_fast_attention(q, k, v, causal=True, order=2, temperature=temperature, padding_mask=mask)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


def test_order2_features_dot_products():
    """`_order2_features_t`: phi(q / T) . phi(k) = f(q . k / T) for every query-key pair."""
    from hf_fastattn.ops.fast import _order2_features_t
    from hf_fastattn.ops.reference import fastmax_weight

    q, k = torch.randn(3, 5, 7), torch.randn(3, 6, 7)
    feats = _order2_features_t(q / 2.0, k)
    assert feats.shape == (3, 1 + 7 + 28, 11)
    torch.testing.assert_close(
        feats[:, :, :5].transpose(1, 2) @ feats[:, :, 5:], fastmax_weight(q @ k.transpose(1, 2) / 2.0, 2)
    )


@pytest.mark.parametrize("order,path", [(2, "cpu-kernel"), (2, "torch"), (1, "torch")])
def test_recurrent_step_in_place_continues_the_chunked_form(monkeypatch, order, path):
    """`fast_recurrent_step_` (decoding on a RecurrentCache): a prefill's final state, then one token at a time with
    the state updated in place, equals the naive reference over the whole sequence, through the C++ step where it is
    available and through the features and `recurrent_linear_step_`; wrong uses are refused."""
    from hf_fastattn.kernels import fast2_causal
    from hf_fastattn.ops import fast_attention_with_state, fast_recurrent_step_

    if path == "torch":
        monkeypatch.setattr(fast2_causal, "supports", lambda *tensors: False)
    elif not fast2_causal.available():
        pytest.skip("the CPU kernel is not available here (no AVX-512 or no compiler)")
    q, k, v = inputs(2, 4, 2, 12, 8, grad=False)
    mask = left_padding(2, 12, 3)
    temperature = 1.3
    out, state = fast_attention_with_state(
        q[:, :, :8], k[:, :, :8], v[:, :, :8], causal=True, order=order, temperature=temperature,
        padding_mask=mask[:, :8], output_final_state=True,
    )  # fmt: skip
    state = tuple(x.contiguous() for x in state)  # as a RecurrentCache stores it
    outs = [out]
    for t in range(8, 12):
        outs.append(
            fast_recurrent_step_(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, order=order,
                                 temperature=temperature, padding_mask=mask[:, t : t + 1])  # fmt: skip
        )
    ref = naive_fast_attention(q, k, v, causal=True, order=order, temperature=temperature, padding_mask=mask)
    torch.testing.assert_close(torch.cat(outs, 2), ref, atol=2e-5, rtol=2e-4)
    with pytest.raises(ValueError, match="takes one token"):
        fast_recurrent_step_(q[:, :, :2], k[:, :, :2], v[:, :, :2], state, order=order)
    with pytest.raises(ValueError, match="contiguous float32 state"):
        fast_recurrent_step_(q[:, :, :1], k[:, :, :1], v[:, :, :1], tuple(x.double() for x in state), order=order)
