"""FAST fastmax on the Triton kernel vs the naive reference (order 1 and 2, causal and bidirectional)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.kernels import fast_attention_triton  # noqa: E402
from hf_fastattn.ops.fast import fast_attention  # noqa: E402
from hf_fastattn.ops.reference import naive_fast_attention  # noqa: E402

from .helpers import LENGTHS, assert_bf16_close, assert_close_all  # noqa: E402

pytestmark = pytest.mark.triton


def pair(causal, order, temperature=1.5, mask=None):
    def fast(q, k, v):
        return fast_attention_triton(
            q, k, v, causal=causal, order=order, temperature=temperature, key_mask=mask
        )

    def ref(q, k, v):
        return naive_fast_attention(
            q, k, v, causal=causal, order=order, temperature=temperature, padding_mask=mask
        )

    return fast, ref


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("order", [1, 2], ids=["order1", "order2"])
def test_fast_fp32_outputs_grads(order, causal, n):
    tensors = [torch.randn(2, 2, n, 16) for _ in range(3)]
    assert_close_all(*pair(causal, order), tensors)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fast_key_mask(causal):
    mask = torch.ones(2, 63, dtype=torch.bool)
    mask[0, :20] = False
    mask[1, 50:] = False
    assert_close_all(*pair(causal, 2, mask=mask), [torch.randn(2, 2, 63, 16) for _ in range(3)])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("order", [1, 2], ids=["order1", "order2"])
def test_fast_bf16_within_twice_reference_error(order, causal):
    assert_bf16_close(*pair(causal, order), [torch.randn(2, 2, 63, 16) for _ in range(3)])


def test_operator_backend_triton_gqa():
    q = torch.randn(1, 4, 30, 16)
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    out = fast_attention(q, k, v, causal=True, order=2, backend="triton")
    ref = fast_attention(q, k, v, causal=True, order=2, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bad_options():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="order"):
        fast_attention_triton(q, q, q, causal=True, order=3, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        fast_attention_triton(q, q, q, causal=True, order=2, temperature=0.0)
    with pytest.raises(TypeError, match="dtypes"):
        fast_attention_triton(q.double(), q.double(), q.double(), causal=True, order=2, temperature=1.0)
