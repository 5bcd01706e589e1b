"""Comparison helpers for operators against the naive references."""

import torch


def inputs(b, h, hkv, n, d, dv=None, *, dtype=torch.float32, grad=True, scale=1.0):
    dv = dv or d
    q = (torch.randn(b, h, n, d) * scale).to(dtype).requires_grad_(grad)
    k = (torch.randn(b, hkv, n, d) * scale).to(dtype).requires_grad_(grad)
    v = torch.randn(b, hkv, n, dv).to(dtype).requires_grad_(grad)
    return q, k, v


def left_padding(b, n, pad):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


def forward_backward(fn, q, k, v):
    """Output and the gradients of q, k, v for a fixed random cotangent."""
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * cot).sum().backward()
    return out.detach(), [x.grad.clone() for x in (q, k, v)]


def assert_matches_reference(fast_fn, ref_fn, q, k, v, *, atol=2e-5, rtol=2e-4):
    out, grads = forward_backward(fast_fn, q, k, v)
    ref, ref_grads = forward_backward(ref_fn, q, k, v)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(
            g, rg, atol=atol * 10, rtol=rtol * 10, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def assert_bf16_close(fast_fn, ref_fn, q32, k32, v32, *, dtype=torch.bfloat16, floor=1e-2):
    """16-bit inputs (bf16, or `dtype`): the error against the fp32 reference may be about twice the reference's own
    error on the same 16-bit inputs (as flash-attention's tests measure it), plus a small floor."""
    ref32 = ref_fn(q32, k32, v32).float()
    q, k, v = (x.to(dtype) for x in (q32, k32, v32))
    ref16 = ref_fn(q, k, v)
    out16 = fast_fn(q, k, v)
    assert out16.dtype == dtype
    assert torch.isfinite(out16).all()
    ref_err = (ref16.float() - ref32).abs().max().item()
    err = (out16.float() - ref32).abs().max().item()
    assert err <= 2 * ref_err + floor, (err, ref_err)


def assert_fp16_close(fast_fn, ref_fn, q32, k32, v32, *, floor=2e-3):
    """fp16 inputs: as `assert_bf16_close`, with a floor for fp16's 11-bit mantissa."""
    assert_bf16_close(fast_fn, ref_fn, q32, k32, v32, dtype=torch.float16, floor=floor)
