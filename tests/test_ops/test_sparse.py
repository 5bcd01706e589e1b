"""sparse_attention (Child et al. strided / fixed patterns) against the naive masked softmax."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hf_fastattn.ops import sparse as sparse_module
from hf_fastattn.ops import sparse_attention
from hf_fastattn.ops.reference import naive_sparse_attention, sparse_pattern_mask

from .helpers import assert_bf16_close, assert_fp16_close, assert_matches_reference, inputs, left_padding

PATTERNS = [
    pytest.param(dict(pattern="strided", stride=8), id="strided8"),
    pytest.param(dict(pattern="strided", stride=8, local=3), id="strided8-local3"),
    pytest.param(dict(pattern="strided", stride=5, local=12), id="strided5-local12"),
    pytest.param(dict(pattern="fixed", stride=16, summary=1), id="fixed16"),
    pytest.param(dict(pattern="fixed", stride=10, summary=4), id="fixed10-summary4"),
]


@pytest.mark.parametrize("n", [1, 63, 500])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_matches_reference(n, causal, pattern):
    q, k, v = inputs(2, 4, 2, n, 16)
    assert_matches_reference(
        lambda q, k, v: sparse_attention(q, k, v, causal=causal, **pattern),
        lambda q, k, v: naive_sparse_attention(q, k, v, causal=causal, **pattern),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparse_padding(pattern):
    q, k, v = inputs(2, 2, 2, 77, 8)
    mask = left_padding(2, 77, 20)
    assert_matches_reference(
        lambda q, k, v: sparse_attention(q, k, v, causal=True, padding_mask=mask, **pattern),
        lambda q, k, v: naive_sparse_attention(q, k, v, causal=True, padding_mask=mask, **pattern),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_decode_rows_equal_full_rows(pattern, causal, nq):
    """Queries at the last positions only (decoding with a K/V cache) == the same rows of the full result."""
    q, k, v = inputs(2, 4, 2, 90, 8, grad=False)
    mask = left_padding(2, 90, 13)
    full = naive_sparse_attention(q, k, v, causal=causal, padding_mask=mask, **pattern)
    rows = sparse_attention(q[:, :, -nq:], k, v, causal=causal, padding_mask=mask, **pattern)
    torch.testing.assert_close(rows, full[:, :, -nq:], atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_causality(pattern):
    """Changing q, k and v from position 45 on leaves outputs 0..44 unchanged and changes later ones."""
    q, k, v = inputs(1, 2, 2, 80, 8, grad=False)
    out = sparse_attention(q, k, v, causal=True, **pattern)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 45:] += 1
    k2[:, :, 45:] *= -2
    v2[:, :, 45:] += 5
    out2 = sparse_attention(q2, k2, v2, causal=True, **pattern)
    torch.testing.assert_close(out2[:, :, :45], out[:, :, :45], atol=0, rtol=0)
    assert not torch.allclose(out2[:, :, 45:], out[:, :, 45:])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fp16_and_fully_padded_rows_are_finite(pattern, causal):
    q, k, v = inputs(2, 2, 2, 64, 16, grad=False, scale=4.0)
    mask = left_padding(2, 64, 64 if not causal else 10)  # bidirectional: every key of row 1 is padding
    out = sparse_attention(q.half(), k.half(), v.half(), causal=causal, padding_mask=mask, **pattern)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    empty = out[1, :, :10] if causal else out[1]
    assert empty.abs().max() == 0
    # and the values (large scores: peaked weights): within twice the fp16 error of the reference itself
    assert_fp16_close(
        lambda q, k, v: sparse_attention(q, k, v, causal=causal, padding_mask=mask, **pattern),
        lambda q, k, v: naive_sparse_attention(q, k, v, causal=causal, padding_mask=mask, **pattern),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(
    "pattern",
    [
        dict(pattern="strided", stride=1),
        dict(pattern="strided", stride=7, local=200),
        dict(pattern="fixed", stride=200),
    ],
    ids=["stride1", "wide-band", "one-block"],
)
def test_covering_pattern_equals_sdpa(causal, pattern):
    q, k, v = inputs(1, 2, 2, 150, 16, grad=False)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(
        sparse_attention(q, k, v, causal=causal, **pattern), expected, atol=2e-5, rtol=2e-4
    )


def test_bf16():
    q, k, v = inputs(1, 2, 2, 120, 16, grad=False)
    assert_bf16_close(
        lambda q, k, v: sparse_attention(q, k, v, causal=True, stride=8),
        lambda q, k, v: naive_sparse_attention(q, k, v, causal=True, stride=8),
        q,
        k,
        v,
    )


def test_pattern_mask_definition():
    m = sparse_pattern_mask(12, causal=False, pattern="strided", stride=4, local=2)
    i, j = 9, torch.arange(12)
    assert m[i].tolist() == [((abs(i - x) < 2) or (abs(i - x) % 4 == 0)) for x in j.tolist()]
    m = sparse_pattern_mask(12, causal=True, pattern="fixed", stride=4, summary=1)
    assert m[9].tolist() == [x <= 9 and (x // 4 == 2 or x % 4 == 3) for x in range(12)]


@pytest.mark.parametrize(
    "pattern,keys_per_query",
    [
        (dict(pattern="strided", stride=16), lambda n: n / 16 + 2 * 16),
        (dict(pattern="strided", stride=16, local=4), lambda n: n / 16 + 2 * 4),
        (dict(pattern="fixed", stride=16), lambda n: n / 16 + 16),
        (dict(pattern="fixed", stride=16, summary=4), lambda n: 4 * n / 16 + 16),
    ],
    ids=["strided16", "strided16-local4", "fixed16", "fixed16-summary4"],
)
def test_matmul_flops_grow_as_n_times_keys_per_query(pattern, keys_per_query):
    """Every matmul counted by torch's FlopCounterMode (no timing): QK^T and PV over about
    N (N / stride + stride) score elements (N (summary N / stride + stride) for "fixed"), never N^2. Inputs that
    need gradients take the masked-matmul form (the counter does not see the inference path's flash kernel:
    `test_flash_pieces_cost` counts that one)."""
    d = 4
    flops = {}
    for n in (1024, 4096):
        q, k, v = inputs(1, 1, 1, n, d, grad=True)
        with FlopCounterMode(display=False) as counter:
            sparse_attention(q, k, v, causal=True, **pattern)
        flops[n] = counter.get_total_flops()
        budget = 2 * 2 * d * n * keys_per_query(n)  # two matmuls, 2 flops per multiply-add
        assert flops[n] <= 1.3 * budget, (n, flops[n], budget)
    assert flops[4096] < 0.3 * 2 * 2 * d * 4096**2  # dense: N^2 (summary 4 of 16 keeps a quarter of the keys)
    # quadrupling N multiplies the cost by 4 (N / stride + stride) growth, not by 16
    assert flops[4096] / flops[1024] <= 1.1 * (4 * keys_per_query(4096)) / keys_per_query(1024)


def test_cost_grows_as_n_times_n_over_stride_plus_stride(monkeypatch):
    """Count the score elements the pieces compute (no timing): N (N / stride + c * stride), never N^2."""
    counted = []
    real = sparse_module._masked_part

    def counting(scores, allowed, v, *dropout_p):
        counted.append(scores.numel())
        return real(scores, allowed, v, *dropout_p)

    monkeypatch.setattr(sparse_module, "_masked_part", counting)
    stride = 16
    for n in (512, 2048):
        counted.clear()
        q, k, v = inputs(1, 1, 1, n, 4, grad=True)  # the masked form (inference takes the flash kernel)
        sparse_attention(q, k, v, causal=True, stride=stride)
        assert 0 < sum(counted) <= n * (n / stride + 2 * stride) * 1.1
        assert sum(counted) < n * n / 4


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_flash_pieces_cost(monkeypatch, pattern):
    """The inference path's flash-kernel calls cover about N (N / stride + 2 stride) (query, key) pairs, never N^2."""
    counted = []
    real = sparse_module._flash_piece

    def counting(q, k, v, *args, **kwargs):
        counted.append(q.shape[:-1].numel() * k.shape[-2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sparse_module, "_flash_piece", counting)
    stride = 16
    for n in (512, 2048):
        counted.clear()
        q, k, v = inputs(1, 1, 1, n, 4, grad=False)
        sparse_attention(q, k, v, causal=True, stride=stride, pattern=pattern)
        assert 0 < sum(counted) <= n * (n / stride + 2 * stride) * 1.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="diagonal", stride=4), "pattern must be one of"),
        (dict(stride=0), "stride must be a positive int"),
        (dict(stride=4, local=0), "local must be a positive int"),
        (dict(pattern="fixed", stride=4, summary=5), r"summary must be an int in \[1, stride=4\]"),
    ],
    ids=["pattern", "stride", "local", "summary"],
)
def test_bad_options(kwargs, match):
    q, k, v = inputs(1, 1, 1, 8, 4, grad=False)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, causal=True, **kwargs)


def test_bad_shapes():
    q, k, v = inputs(2, 3, 2, 8, 4, grad=False)
    with pytest.raises(ValueError, match="must be a multiple of the K/V heads"):
        sparse_attention(q, k, v, causal=True, stride=4)
    q, k, v = inputs(2, 2, 2, 8, 4, grad=False)
    with pytest.raises(ValueError, match="same length"):
        sparse_attention(q, k, v[:, :, :7], causal=True, stride=4)
    with pytest.raises(ValueError, match="at most"):
        sparse_attention(q, k[:, :, :6], v[:, :, :6], causal=True, stride=4)
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        sparse_attention(q, k, v, causal=True, stride=4, padding_mask=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("n", [1, 7, 16, 37, 100])
@pytest.mark.parametrize(
    "options", [dict(stride=8), dict(stride=8, local=3, summary=2), dict(stride=4, local=9, summary=4)],
    ids=["stride8", "local3-summary2", "local9-summary4"],
)
def test_inference_flash_path_matches_reference(pattern, n, options):
    """Causal inference without padding takes the flash-kernel form (band or block diagonal, plus periodic or
    summary keys, merged by log-sum-exp): equal to the naive masked softmax, lengths not multiples of the stride,
    GQA, empty periodic rows (the first `local` positions) included."""
    q, k, v = inputs(2, 4, 2, n, 16, grad=False)
    calls = []
    real = sparse_module._flash_piece
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparse_module, "_flash_piece", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        with torch.no_grad():
            out = sparse_attention(q, k, v, causal=True, pattern=pattern, **options)
    assert calls, "the inference path did not take the flash form"
    ref = naive_sparse_attention(q, k, v, causal=True, pattern=pattern, **options)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_inference_with_padding_or_grad_takes_masked_form(pattern):
    """Padding (a mask per batch row) and gradients go through the masked form, equal to the reference."""
    q, k, v = inputs(2, 2, 2, 45, 8, grad=False)
    mask = left_padding(2, 45, 11)
    with torch.no_grad():
        out = sparse_attention(q, k, v, causal=True, pattern=pattern, stride=8, padding_mask=mask)
    ref = naive_sparse_attention(q, k, v, causal=True, pattern=pattern, stride=8, padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    q, k, v = inputs(1, 2, 2, 45, 8, grad=True)
    assert_matches_reference(
        lambda q, k, v: sparse_attention(q, k, v, causal=True, pattern=pattern, stride=8),
        lambda q, k, v: naive_sparse_attention(q, k, v, causal=True, pattern=pattern, stride=8),
        q, k, v,
    )
