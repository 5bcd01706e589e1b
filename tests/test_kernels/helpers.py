"""Comparison helpers for the Triton kernels against the naive references, and the device the kernels run on."""

import torch

from hf_fastattn.kernels.dispatch import interpreter_enabled

LENGTHS = [1, 63, 130]

# the compiled kernels on a GPU; Triton's interpreter on CPU tensors without one (or when TRITON_INTERPRET=1 was set
# by hand: the root conftest sets it only without a GPU)
INTERPRETED = interpreter_enabled()
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")


def randn(*shape, dtype=torch.float32):
    """`torch.randn` drawn on the CPU (the same numbers on every machine for a seed), then put on `DEVICE`."""
    return torch.randn(*shape).to(DEVICE, dtype)


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape).to(DEVICE, dtype)


def grads_of(outputs, inputs, cotangents):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def run(fn, inputs, seed=1):
    """Outputs of `fn(*inputs)` (a tensor or a tuple of tensors) and the gradients of all inputs."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen).to(o.device) for o in outputs]
    return [o.detach() for o in outputs], grads_of(outputs, inputs, cots)


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


def assert_close_all(fast_fn, ref_fn, tensors, *, atol=1e-5, rtol=1e-4):
    """fp32: outputs (final states included) and the gradients of every input match tightly."""
    out, grads = run(fast_fn, leaves(tensors))
    ref, ref_grads = run(ref_fn, leaves(tensors))
    for i, (a, b) in enumerate(zip(out, ref)):
        torch.testing.assert_close(
            a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}"
        )
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, msg=lambda m, i=i: f"grad {i}: {m}")


def assert_bf16_close(fast_fn, ref_fn, tensors, *, floor=1e-2, dtype=torch.bfloat16):
    """16-bit inputs (bf16, or `dtype`): the error against the fp32 reference is at most about twice the reference's
    own error on the same 16-bit inputs (as flash-attention's tests measure it), outputs and gradients."""
    ref32, ref32_grads = run(ref_fn, leaves(tensors))
    ref16, ref16_grads = run(ref_fn, leaves(tensors, dtype))
    out16, out16_grads = run(fast_fn, leaves(tensors, dtype))
    assert out16[0].dtype == dtype
    pairs = [*zip(out16, ref16, ref32), *zip(out16_grads, ref16_grads, ref32_grads)]
    for i, (fast, ref_low, ref_high) in enumerate(pairs):
        assert torch.isfinite(fast).all(), i
        ref_err = (ref_low.float() - ref_high.float()).abs().max().item()
        err = (fast.float() - ref_high.float()).abs().max().item()
        scale = ref_high.float().abs().max().item()
        assert err <= 2 * ref_err + floor * max(1.0, scale), (i, err, ref_err)


def assert_fp16_close(fast_fn, ref_fn, tensors, *, floor=2e-3):
    """fp16 inputs: as `assert_bf16_close`; fp16 has 3 more mantissa bits than bf16, so a tighter floor."""
    assert_bf16_close(fast_fn, ref_fn, tensors, floor=floor, dtype=torch.float16)
