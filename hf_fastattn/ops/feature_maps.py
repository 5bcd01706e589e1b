"""Feature maps phi for linear attention: phi(q) . phi(k) stands in for exp(q . k).

Every map is an `nn.Module` taking `[..., D]` and returning non-negative features `[..., F]`, so that fixed
maps (elu+1, relu, fastmax) and learned maps (T2R, Hedgehog; see `hf_fastattn.conversion`) plug into the same
operators. A learned map may be per head: it then receives `[B, H, N, D]` and uses the head dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """Base class: `forward(x [..., D]) -> [..., F]`; `feature_dim(head_dim)` gives F."""

    def feature_dim(self, head_dim: int) -> int:
        return head_dim


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, so denominators stay positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class FastmaxFeatureMap(FeatureMap):
    """Features whose dot product is fastmax's f(s) = 1 + s + s^2/2 (order 2) or 1 + s (order 1), s = x.y / T.

    x is used as given (normalize it first with `fast_normalize`). The order-2 term uses the symmetric part of
    x x^T only: diagonal x_i^2 / sqrt(2) and upper triangle x_i x_j (i < j), so F = 1 + D + D(D+1)/2 rather than
    1 + D + D^2, with the same dot products.
    """

    def __init__(self, order: int = 2, temperature: float = 1.0):
        super().__init__()
        self.order = order
        self.temperature = temperature

    def feature_dim(self, head_dim: int) -> int:
        return 1 + head_dim + (head_dim * (head_dim + 1) // 2 if self.order == 2 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / math.sqrt(self.temperature)
        if self.order == 1:
            return torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)
        return _SymmetricQuadraticFeatures.apply(x)


def _quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """[1, x, x_a x_b for a <= b (diagonal / sqrt 2)]: row a of the upper triangle is x_a * x[a:], built by slices
    (an index gather over the D^2 / 2 columns is ~4x slower on CPU)."""
    d = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], 1 + d + d * (d + 1) // 2)
    out[..., 0] = 1
    out[..., 1 : d + 1] = x
    offset = d + 1
    for a in range(d):
        torch.mul(x[..., a : a + 1], x[..., a:], out=out[..., offset : offset + d - a])
        out[..., offset] *= 1 / math.sqrt(2)
        offset += d - a
    return out


class _SymmetricQuadraticFeatures(torch.autograd.Function):
    """Autograd for `_quadratic_features` in O(D^2) work per token and ~3 D ops, computed from the compact rows
    (autograd of the slice construction records ~5 D ops and a D x D buffer is slower still): with M the upper
    triangle of the quadratic gradients, grad x = g_lin + (M + M^T) x with the diagonal weighted sqrt(2).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _quadratic_features(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        d = x.shape[-1]
        gx = grad[..., 1 : d + 1].clone()
        diag = torch.empty_like(x)
        offset = d + 1
        for a in range(d):
            row = grad[..., offset : offset + d - a]  # d phi / d(x_a x_b) for b >= a
            # (M x)_a = sum_b g_ab x_b  and  (M^T x)_b += g_ab x_a
            gx[..., a] += (row * x[..., a:]).sum(-1)
            gx[..., a:].addcmul_(row, x[..., a : a + 1])
            diag[..., a] = row[..., 0]
            offset += d - a
        # both sums counted the diagonal term g_aa x_a once; its derivative is sqrt(2) g_aa x_a
        return gx.addcmul_(diag, x, value=math.sqrt(2) - 2)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"elu": EluFeatureMap, "relu": ReluFeatureMap}


def get_feature_map(feature_map: str | nn.Module) -> nn.Module:
    """Resolve a feature map given by name ("elu", "relu") or as an `nn.Module`."""
    if isinstance(feature_map, nn.Module):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]()
    raise ValueError(
        f"feature_map must be one of {sorted(FEATURE_MAPS)} or an nn.Module mapping [..., D] to [..., F], "
        f"got {feature_map!r}"
    )
