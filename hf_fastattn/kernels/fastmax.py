"""FAST fastmax attention (order 1 / 2) on the Triton linear-attention kernel.

f(s) = 1 + s (+ s^2 / 2) with s = q_hat . k_hat / T is a dot product of explicit features (`FastmaxFeatureMap`:
[1, x / sqrt(T)] and, for order 2, the upper triangle of x x^T / T, F = 1 + D + D(D+1)/2). The features are built
in a PyTorch prologue (normalization, feature map, key mask) and fed to `chunk_linear_fwd_kernel`, which walks the
feature dimension in blocks, so any head dimension works. Gradients flow through the prologue by autograd.

Cost: order 2 stores q and k features of F = O(D^2) per token (D = 64: F = 2145); a dedicated kernel that builds
the quadratic features in registers from q_hat and k_hat would avoid that memory traffic (not done yet).
"""

from __future__ import annotations

import torch

from ..ops.feature_maps import FastmaxFeatureMap
from ..ops.reference import fast_normalize
from ._jit import check_dtypes
from .linear_attn import linear_attention_triton


def fast_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    order: int,
    temperature: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAST fastmax attention with the Triton kernel.

    Args:
        q, k: `[B, H, N, D]` raw queries and keys (normalized here as `fast_normalize`). v: `[B, H, N, Dv]`.
        causal: attend to j <= i (True) or all j (False).
        order: 1 or 2. temperature: T > 0 (order 1 needs T >= 1 for non-negative weights).
        key_mask: `[B, N]` bool, True for real tokens; masked keys get weight 0.

    Returns:
        `[B, H, N, Dv]` in v's dtype; differentiable in q, k, v.
    """
    check_dtypes("fast_attention_triton", q, k, v)
    if order not in (1, 2):
        raise ValueError(f"fast_attention_triton: order must be 1 or 2, got {order!r}")
    if not temperature > 0:
        raise ValueError(f"fast_attention_triton: temperature must be > 0, got {temperature!r}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "fast_attention_triton: expected q, k [B, H, N, D] of one shape and v [B, H, N, Dv] (same heads), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    fmap = FastmaxFeatureMap(order, temperature)
    # fp32 features for fp32 inputs; 16-bit features halve the prologue's memory for 16-bit inputs
    feat_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    qf = fmap(fast_normalize(q.float())).to(feat_dtype)
    kf = fmap(fast_normalize(k.float()))
    if key_mask is not None:
        if tuple(key_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"fast_attention_triton: key_mask must be [B, N] = {(q.shape[0], q.shape[2])}")
        kf = kf * key_mask.to(device=kf.device, dtype=kf.dtype)[:, None, :, None]
    out, _ = linear_attention_triton(qf, kf.to(feat_dtype), v, causal=causal)
    return out


__all__ = ["fast_attention_triton"]
