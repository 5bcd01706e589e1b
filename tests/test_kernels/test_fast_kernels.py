"""FAST fastmax on the Triton kernel vs the naive reference (order 1 and 2, causal and bidirectional, head_dim 16
and 64, fp32 / bf16 / fp16)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.kernels import fast_attention_triton  # noqa: E402
from hf_fastattn.ops.fast import fast_attention  # noqa: E402
from hf_fastattn.ops.reference import naive_fast_attention  # noqa: E402

from .helpers import (  # noqa: E402
    DEVICE,
    INTERPRETED,
    LENGTHS,
    assert_bf16_close,
    assert_close_all,
    assert_fp16_close,
    randn,
)

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
    tensors = [randn(2, 2, n, 16) for _ in range(3)]
    assert_close_all(*pair(causal, order), tensors)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("order", [1, 2], ids=["order1", "order2"])
def test_fast_head_dim_64(order, causal):
    """A real head size: order 2 has F = 1 + 64 + 64 * 65 / 2 = 2145 features, 34 feature blocks of the kernel
    (small N: the interpreter walks every block in Python)."""
    n = 20 if INTERPRETED else 300
    mask = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    mask[0, :5] = False
    tensors = [randn(1, 1 if INTERPRETED else 4, n, 64) for _ in range(3)]
    assert_close_all(*pair(causal, order, mask=mask), tensors, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fast_key_mask(causal):
    mask = torch.ones(2, 63, dtype=torch.bool, device=DEVICE)
    mask[0, :20] = False
    mask[1, 50:] = False
    assert_close_all(*pair(causal, 2, mask=mask), [randn(2, 2, 63, 16) for _ in range(3)])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("order", [1, 2], ids=["order1", "order2"])
def test_fast_bf16_within_twice_reference_error(order, causal):
    assert_bf16_close(*pair(causal, order), [randn(2, 2, 63, 16) for _ in range(3)])


@pytest.mark.parametrize(
    "order,causal,d",
    [
        pytest.param(order, causal, d, id=f"order{order}-{'causal' if causal else 'bidirectional'}-d{d}")
        for order, causal, d in [(1, True, 16), (2, True, 16), (1, False, 16), (2, False, 16), (1, True, 64), (2, True, 64)]
    ],
)
def test_fast_fp16_within_twice_reference_error(order, causal, d):
    n = 20 if INTERPRETED and d == 64 else 63
    assert_fp16_close(*pair(causal, order), [randn(1, 2, n, d) for _ in range(3)])


def test_operator_backend_triton_gqa():
    q = randn(1, 4, 30, 16)
    k, v = randn(1, 2, 30, 16), randn(1, 2, 30, 16)
    out = fast_attention(q, k, v, causal=True, order=2, backend="triton")
    ref = fast_attention(q, k, v, causal=True, order=2, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bad_options():
    q = randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="order"):
        fast_attention_triton(q, q, q, causal=True, order=3, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        fast_attention_triton(q, q, q, causal=True, order=2, temperature=0.0)
    with pytest.raises(TypeError, match="dtypes"):
        fast_attention_triton(q.double(), q.double(), q.double(), causal=True, order=2, temperature=1.0)
