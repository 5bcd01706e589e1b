"""torch.library registration: opcheck (schema, fake tensors, autograd registration) and torch.compile tracing."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.kernels.block_sparse import block_sparse_fwd_op  # noqa: E402
from hf_fastattn.kernels.linear_attn import (  # noqa: E402
    chunk_linear_op,
    linear_attention_triton,
    recurrent_linear_step_op,
)
from hf_fastattn.ops.reference import naive_feature_attention  # noqa: E402

from .helpers import DEVICE, rand, randn  # noqa: E402

pytestmark = pytest.mark.triton

# test_aot_dispatch_dynamic is left out: it re-traces under dynamic shapes for many minutes in the interpreter
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_opcheck_chunk_linear(causal):
    q, k = rand(1, 2, 20, 16), rand(1, 2, 20, 16)
    v, s0 = randn(1, 2, 20, 17), randn(1, 2, 16, 17)
    for x in (q, k, v, s0):
        x.requires_grad_(True)
    torch.library.opcheck(chunk_linear_op, (q, k, v, s0, causal, False), test_utils=CHECKS)
    torch.library.opcheck(chunk_linear_op, (q, k, v, None, causal, True), test_utils=CHECKS)


def test_opcheck_recurrent_step():
    q, k, v = rand(1, 2, 1, 16), rand(1, 2, 1, 16), randn(1, 2, 1, 16)
    s, z = randn(1, 2, 16, 16), rand(1, 2, 16)
    torch.library.opcheck(recurrent_linear_step_op, (q, k, v, s, z, 1e-6), test_utils=CHECKS)


def test_opcheck_block_sparse():
    q, k, v = (randn(1, 2, 40, 16).requires_grad_() for _ in range(3))
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    args = (q, k, v, mask, True, "strided", 8, 8, 1, 0.25, None)
    torch.library.opcheck(block_sparse_fwd_op, args, test_utils=CHECKS)


def test_torch_compile_traces_through_kernels():
    """fullgraph compile (aot_eager: the interpreter cannot run Inductor-generated Triton) of forward + backward."""
    torch._dynamo.reset()

    def f(qf, kf, v):
        out, (s, z) = linear_attention_triton(qf, kf, v, causal=True, output_final_state=True)
        return out.sum() + s.sum() + z.sum()

    qf, kf, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(qf, kf, v)
    loss.backward()
    ref_q, ref_k, ref_v = (x.detach().clone().requires_grad_(True) for x in (qf, kf, v))
    out, (s, z) = naive_feature_attention(ref_q, ref_k, ref_v, causal=True)
    (out.sum() + s.sum() + z.sum()).backward()
    torch.testing.assert_close(loss, out.sum() + s.sum() + z.sum())
    for a, b in zip((qf, kf, v), (ref_q, ref_k, ref_v)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
