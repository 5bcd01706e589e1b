"""sparse_attention (Child et al. strided / fixed patterns) against the naive masked softmax."""

import pytest
import torch
import torch.nn.functional as F

from hf_fastattn.ops import sparse as sparse_module
from hf_fastattn.ops import sparse_attention
from hf_fastattn.ops.reference import naive_sparse_attention, sparse_pattern_mask

from .helpers import assert_bf16_close, assert_matches_reference, inputs, left_padding

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


@pytest.mark.parametrize("pattern", PATTERNS)
def test_decode_rows_equal_full_rows(pattern):
    """Queries at the last positions only (decoding with a K/V cache) == the same rows of the full result."""
    q, k, v = inputs(1, 2, 2, 90, 8, grad=False)
    full = naive_sparse_attention(q, k, v, causal=True, **pattern)
    rows = sparse_attention(q[:, :, -3:], k, v, causal=True, **pattern)
    torch.testing.assert_close(rows, full[:, :, -3:], atol=2e-5, rtol=2e-4)


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


def test_cost_grows_as_n_times_n_over_stride_plus_stride(monkeypatch):
    """Count the score elements the pieces compute (no timing): N (N / stride + c * stride), never N^2."""
    counted = []
    real = sparse_module._masked_part

    def counting(scores, allowed, v):
        counted.append(scores.numel())
        return real(scores, allowed, v)

    monkeypatch.setattr(sparse_module, "_masked_part", counting)
    stride = 16
    for n in (512, 2048):
        counted.clear()
        q, k, v = inputs(1, 1, 1, n, 4, grad=False)
        sparse_attention(q, k, v, causal=True, stride=stride)
        assert sum(counted) <= n * (n / stride + 2 * stride) * 1.1
        assert sum(counted) < n * n / 4


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
