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


# at most this many rows (tokens x heads) take the gather form of `_quadratic_features`: a decoding step's few rows
# are op-bound (the slice form runs 2 D small ops), long sequences bandwidth-bound (the gather is ~4x slower there)
GATHER_ROWS = 256
_PAIRS: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _pairs(d: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index a * d + b over the upper triangle a <= b in row order, weight: 1/sqrt(2) on the diagonal, else
    1, built in float64 and cached in `dtype`, so a decoding step converts nothing)."""
    key = (d, device, dtype)
    if key not in _PAIRS:
        a, b = torch.triu_indices(d, d, device=device)
        weight = torch.ones(a.shape, dtype=torch.float64, device=device)
        weight[a == b] = 1 / math.sqrt(2)
        _PAIRS[key] = (a * d + b, weight.to(dtype))
    return _PAIRS[key]


def _quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """[1, x, x_a x_b for a <= b (diagonal / sqrt 2)]: row a of the upper triangle is x_a * x[a:], built by slices
    (an index gather over the D^2 / 2 columns is ~4x slower on CPU), or for at most `GATHER_ROWS` rows (a decoding
    step) by one gather of the pairs, a few ops instead of 2 D."""
    d = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], 1 + d + d * (d + 1) // 2)
    out[..., 0] = 1
    out[..., 1 : d + 1] = x
    if x.numel() // max(d, 1) <= GATHER_ROWS and not torch.compiler.is_compiling():
        # the outer product x x^T, then its upper triangle by one gather
        flat, weight = _pairs(d, x.device, x.dtype)
        quadratic = out[..., d + 1 :]
        quadratic.copy_((x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)[..., flat])
        quadratic.mul_(weight)
        return out
    offset = d + 1
    compiling = torch.compiler.is_compiling()  # dynamo does not trace `out=` into a non-contiguous slice
    for a in range(d):
        if compiling:
            out[..., offset : offset + d - a] = x[..., a : a + 1] * x[..., a:]
        else:
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


class T2RFeatureMap(FeatureMap):
    """T2R (Kasai et al. 2021): phi(x) = relu(W x + b), one learned map per head, shared by queries and keys.

    Weights `[H, D, F]` and biases `[H, F]` start random, as `nn.Linear`'s default (the paper trains the map from a
    random init together with the rest of the model). Takes `[B, H, N, D]` (`per_head`), returns `[B, H, N, F]`.
    """

    per_head = True

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64):
        super().__init__()
        self.num_heads, self.head_dim, self.out_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default for every head: U(-1/sqrt(D), 1/sqrt(D)) for weights and biases
        bound = 1 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def feature_dim(self, head_dim: int) -> int:
        return self.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        # matmul broadcasts [B, H, N, D] @ [H, D, F] (measured 20-50% faster than the equivalent einsum, forward and
        # backward, one decoding token to 2048-token training blocks)
        return F.relu(torch.matmul(x, w) + b[:, None, :])


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024): phi(x) = [softmax(x W + b), softmax(-(x W + b))] per head, W starting at identity.

    The two softmaxes over the F features make phi(q) . phi(k) spiky and monotone in q . k near the identity init,
    which is what lets it mimic softmax attention after a short attention transfer (LoLCATs). Takes
    `[B, H, N, D]` (`per_head`), returns `[B, H, N, 2F]`; F defaults to D (then W = I exactly).
    """

    per_head = True

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.out_dim = head_dim if feature_dim is None else feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.out_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, self.out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # identity (a rectangular one when F != D), for every head
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.head_dim, self.out_dim).expand_as(self.weight))
            self.bias.zero_()

    def feature_dim(self, head_dim: int) -> int:
        return 2 * self.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        z = torch.matmul(x, w) + b[:, None, :]  # as T2R's map: matmul broadcasts over B (faster than einsum)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


LEARNED_FEATURE_MAPS: dict[str, type[FeatureMap]] = {"t2r": T2RFeatureMap, "hedgehog": HedgehogFeatureMap}


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"elu": EluFeatureMap, "relu": ReluFeatureMap}
_NAMED_INSTANCES: dict[str, FeatureMap] = {}


def get_feature_map(feature_map: str | nn.Module) -> nn.Module:
    """Resolve a feature map given by name ("elu", "relu") or as an `nn.Module`."""
    if isinstance(feature_map, nn.Module):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        # the named maps hold no parameters: one instance per name (built on every attention call, this was a
        # tenth of a decoding step's attention time)
        if feature_map not in _NAMED_INSTANCES:
            _NAMED_INSTANCES[feature_map] = FEATURE_MAPS[feature_map]()
        return _NAMED_INSTANCES[feature_map]
    raise ValueError(
        f"feature_map must be one of {sorted(FEATURE_MAPS)} or an nn.Module mapping [..., D] to [..., F], "
        f"got {feature_map!r}"
    )
