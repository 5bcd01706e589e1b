"""Comparison helpers for the Triton kernels against the naive references."""

import torch

LENGTHS = [1, 63, 130]


def grads_of(outputs, inputs, cotangents):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def run(fn, inputs, seed=1):
    """Outputs of `fn(*inputs)` (a tensor or a tuple of tensors) and the gradients of all inputs."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen) for o in outputs]
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


def assert_bf16_close(fast_fn, ref_fn, tensors, *, floor=1e-2):
    """bf16 inputs: the error against the fp32 reference is at most about twice the reference's own bf16 error."""
    ref32, ref32_grads = run(ref_fn, leaves(tensors))
    ref16, ref16_grads = run(ref_fn, leaves(tensors, torch.bfloat16))
    out16, out16_grads = run(fast_fn, leaves(tensors, torch.bfloat16))
    assert out16[0].dtype == torch.bfloat16
    pairs = [*zip(out16, ref16, ref32), *zip(out16_grads, ref16_grads, ref32_grads)]
    for i, (fast, ref_low, ref_high) in enumerate(pairs):
        assert torch.isfinite(fast).all(), i
        ref_err = (ref_low.float() - ref_high.float()).abs().max().item()
        err = (fast.float() - ref_high.float()).abs().max().item()
        scale = ref_high.float().abs().max().item()
        assert err <= 2 * ref_err + floor * max(1.0, scale), (i, err, ref_err)
