"""Block-sparse softmax kernel vs the naive reference for the Child et al. patterns (fp32 / bf16 / fp16, head_dim 16
and 64)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.kernels import sparse_attention_triton  # noqa: E402
from hf_fastattn.kernels.block_sparse import block_table  # noqa: E402
from hf_fastattn.ops.reference import naive_sparse_attention, sparse_pattern_mask  # noqa: E402
from hf_fastattn.ops.sparse import sparse_attention  # noqa: E402

from .helpers import DEVICE, LENGTHS, assert_bf16_close, assert_close_all, assert_fp16_close, randn  # noqa: E402

pytestmark = pytest.mark.triton

PATTERNS = {
    "strided": dict(pattern="strided", stride=40, local=5, summary=1),
    "fixed": dict(pattern="fixed", stride=40, local=40, summary=3),
}


def pair(causal, spec, mask=None, scaling=0.3, block=None):
    def fast(q, k, v):
        return sparse_attention_triton(
            q, k, v, causal=causal, scaling=scaling, key_mask=mask, block=block, **spec
        )

    def ref(q, k, v):
        return naive_sparse_attention(q, k, v, causal=causal, scaling=scaling, padding_mask=mask, **spec)

    return fast, ref


@pytest.mark.parametrize("n", [1, 63, 130, 300], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("spec", [(8, 8, 1), (48, 8, 1), (40, 5, 3), (16, 3, 16), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_block_table_is_exact(pattern, spec, causal, n):
    """A block is listed iff it holds an allowed pair of the token-level pattern."""
    stride, local, summary = spec
    bm = 16
    kw = dict(causal=causal, pattern=pattern, stride=stride, local=local, summary=summary)
    mask = sparse_pattern_mask(n, **kw)
    nb = -(-n // bm)
    padded = torch.zeros(nb * bm, nb * bm, dtype=torch.bool)
    padded[:n, :n] = mask
    expected = padded.view(nb, bm, nb, bm).any(3).any(1)
    assert torch.equal(block_table(n, bm, bm, **kw), expected)


def test_blocks_are_skipped():
    table = block_table(1024, 64, 64, causal=True, pattern="strided", stride=256, local=64, summary=1)
    assert table.sum() < 0.6 * torch.ones(16, 16).tril().sum()


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_fp32_outputs_grads(pattern, causal, n):
    mask = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
    mask[0, : n // 3] = False
    tensors = [randn(2, 2, n, 16) for _ in range(3)]
    assert_close_all(*pair(causal, PATTERNS[pattern], mask=mask), tensors)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_head_dim_64(pattern, causal):
    mask = torch.ones(1, 90, dtype=torch.bool, device=DEVICE)
    mask[0, :7] = False
    assert_close_all(
        *pair(causal, PATTERNS[pattern], mask=mask, scaling=64**-0.5), [randn(1, 2, 90, 64) for _ in range(3)]
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sparse_small_blocks_skip_and_match(causal):
    spec = dict(pattern="strided", stride=48, local=8, summary=1)
    assert_close_all(*pair(causal, spec, block=16), [randn(1, 2, 130, 16) for _ in range(3)])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_bf16_within_twice_reference_error(pattern, causal):
    assert_bf16_close(*pair(causal, PATTERNS[pattern]), [randn(2, 2, 63, 16) for _ in range(3)])


@pytest.mark.parametrize("d", [16, 64], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_fp16_within_twice_reference_error(pattern, causal, d):
    assert_fp16_close(*pair(causal, PATTERNS[pattern], scaling=d**-0.5), [randn(1, 2, 63, d) for _ in range(3)])


def test_operator_backend_triton_gqa_padding():
    q = randn(2, 4, 50, 16)
    k, v = randn(2, 2, 50, 16), randn(2, 2, 50, 16)
    mask = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    kw = dict(causal=True, pattern="strided", stride=8, padding_mask=mask)
    torch.testing.assert_close(
        sparse_attention(q, k, v, backend="triton", **kw), sparse_attention(q, k, v, backend="torch", **kw)
    )


def test_bad_inputs_name_the_limit():
    q = randn(1, 2, 4, 300)
    spec = PATTERNS["strided"]
    with pytest.raises(ValueError, match="up to 256"):
        sparse_attention_triton(q, q, q, causal=True, scaling=1.0, **spec)
    q = randn(1, 2, 4, 16)
    with pytest.raises(TypeError, match="dtypes"):
        sparse_attention_triton(q.double(), q.double(), q.double(), causal=True, scaling=1.0, **spec)
    with pytest.raises(ValueError, match="pattern"):
        sparse_attention_triton(q, q, q, causal=True, scaling=1.0, **{**spec, "pattern": "dense"})
    with pytest.raises(ValueError, match="block"):
        sparse_attention_triton(q, q, q, causal=True, scaling=1.0, block=24, **spec)
