"""Naive quadratic references: materialize the N x N weights in fp32. For tests and debugging only: nothing in the
library imports this module (`tests/test_import_structure.py` checks it).

Every efficient operator in `hf_fastattn.ops` and `hf_fastattn.kernels` is checked against these. The helpers they
share with the efficient code (`repeat_kv`, `allowed_mask`, `fast_normalize`, `fastmax_weight`, `sparse_pattern_mask`)
live in `hf_fastattn.ops.common` and are re-exported here.
Layout: q `[B, H, N, D]`, k `[B, Hkv, N, D]`, v `[B, Hkv, N, Dv]` with Hkv dividing H; outputs `[B, H, N, Dv]`
in the dtype of q. `padding_mask` is `[B, N]` bool, True for real tokens; a padded key contributes nothing.
"""

from __future__ import annotations

import math

import torch

from .common import allowed_mask, fast_normalize, fastmax_weight, repeat_kv, sparse_pattern_mask
from .feature_maps import FeatureMap, get_feature_map


def naive_weighted_attention(weights: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Normalize non-negative `weights` `[B, H, Nq, Nk]` per row and apply them to `v`; empty rows give 0."""
    denom = weights.sum(-1, keepdim=True)
    return (weights @ v.float() / denom.clamp_min(1e-6)).to(out_dtype)


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str | FeatureMap | torch.nn.Module = "elu",
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), over allowed j (Katharopoulos et al. 2020)."""
    fmap = get_feature_map(feature_map)
    h = q.shape[1]
    qf = fmap(q.float())
    kf = repeat_kv(fmap(k.float()), h)
    weights = qf @ kf.transpose(-1, -2)
    allowed = allowed_mask(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    return naive_weighted_attention(weights * allowed, repeat_kv(v, h), q.dtype)


def naive_feature_attention(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Linear attention on already feature-mapped `qf` `[B, H, N, F]`, `kf` `[B, H, N, F]`, `v` `[B, H, N, Dv]`.

    Returns `(out [B, H, N, Dv], (S [B, H, F, Dv], z [B, H, F]))`, the final recurrent state
    S = S0 + sum_j kf_j v_j^T, z = z0 + sum_j kf_j. The initial state counts as keys seen before position 0.
    """
    qf, kf, vf = qf.float(), kf.float(), v.float()
    n = qf.shape[2]
    weights = qf @ kf.transpose(-1, -2)
    if causal:
        weights = weights * allowed_mask(n, n, causal=True, device=qf.device)
    num = weights @ vf
    den = weights.sum(-1)
    s_final = kf.transpose(-1, -2) @ vf
    z_final = kf.sum(2)
    if initial_state is not None:
        s0, z0 = initial_state[0].float(), initial_state[1].float()
        num = num + qf @ s0
        den = den + (qf * z0[:, :, None, :]).sum(-1)
        s_final, z_final = s_final + s0, z_final + z0
    out = num / den.clamp_min(1e-6)[..., None]
    return out.to(v.dtype), (s_final, z_final)


def naive_fast_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    order: int = 2,
    temperature: float = 1.0,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAST fastmax (Gerami et al. 2024), per-token normalization: weights f(q_hat.k_hat / T), rows normalized."""
    h = q.shape[1]
    qn = fast_normalize(q.float())
    kn = repeat_kv(fast_normalize(k.float()), h)
    weights = fastmax_weight(qn @ kn.transpose(-1, -2) / temperature, order)
    allowed = allowed_mask(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    return naive_weighted_attention(weights * allowed, repeat_kv(v, h), q.dtype)


def naive_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    allowed: torch.Tensor | None = None,
    causal: bool = False,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention in fp32 restricted to `allowed` (`[..., Nq, Nk]` bool); rows with no key give 0."""
    h = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scaling is None else scaling
    scores = q.float() @ repeat_kv(k, h).float().transpose(-1, -2) * scale
    mask = allowed_mask(q.shape[2], k.shape[2], causal=causal, padding_mask=padding_mask, device=q.device)
    if allowed is not None:
        mask = mask & allowed
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ repeat_kv(v, h).float()).to(q.dtype)


def naive_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    pattern: str = "strided",
    stride: int,
    local: int | None = None,
    summary: int = 1,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention under `sparse_pattern_mask` (self-attention: Nq == Nk)."""
    allowed = sparse_pattern_mask(
        q.shape[2], causal=causal, pattern=pattern, stride=stride, local=local, summary=summary, device=q.device
    )
    return naive_softmax_attention(q, k, v, allowed=allowed, scaling=scaling, padding_mask=padding_mask)


def _sinks_of(mask: torch.Tensor, sinks: int, used: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, N]` bool: the first `sinks` real keys of each row (after `used` `[B]` sinks seen before)."""
    rank = torch.cumsum(mask.long(), dim=1) - 1 + (0 if used is None else used.long()[:, None])
    return mask & (rank < sinks)


def naive_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | torch.nn.Module,
    window: int,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
    sinks: int = 0,
    key_feature_map: str | torch.nn.Module | None = None,
    linear_weight: str = "1-gamma",
) -> torch.Tensor:
    """LoLCATs sliding-window hybrid (causal self-attention, Nq == N), one `[B, H, N, N]` weight matrix:
    w_ij = gamma_h exp(s_ij - m_i) for j in the softmax set (i - W < j <= i, or j one of the first `sinks` real keys,
    j <= i), lambda_h phi_q(q_i).phi_k(k_j) for the other j <= i - W, with s_ij = q_i.k_j * scaling, m_i the largest
    s_ij of the softmax set, gamma_h = sigmoid(window_factor_h) (1/2 when None) and lambda_h = 1 - gamma_h
    (`linear_weight="1-gamma"`) or 1 ("1"); padded keys get 0; rows normalized."""
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    fmap = get_feature_map(feature_map)
    kmap = fmap if key_feature_map is None else get_feature_map(key_feature_map)
    qf, kf, vf = q.float(), repeat_kv(k, h).float(), repeat_kv(v, h).float()
    allowed = allowed_mask(n, n, causal=True, padding_mask=padding_mask, device=q.device)
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask.bool()
    sink = _sinks_of(real, sinks)[:, None, None, :]
    in_window = allowed & ((i - j < window) | sink)
    beyond = allowed & (i - j >= window) & ~sink
    scores = qf @ kf.transpose(-1, -2) * scale
    m = torch.where(in_window, scores, torch.full_like(scores, -math.inf)).amax(-1, keepdim=True)
    m = torch.nan_to_num(m, neginf=0.0)
    gamma = torch.full((h,), 0.5) if window_factor is None else torch.sigmoid(window_factor.float())
    gamma = gamma.to(q.device).view(1, h, 1, 1)
    lam = 1 - gamma if linear_weight == "1-gamma" else torch.ones_like(gamma)
    soft = torch.exp(torch.where(in_window, scores - m, torch.full_like(scores, -math.inf)))
    linear = fmap(qf) @ kmap(kf).transpose(-1, -2)
    weights = torch.where(in_window, gamma * soft, torch.where(beyond, lam * linear, torch.zeros_like(linear)))
    return naive_weighted_attention(weights, vf, v.dtype)


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | torch.nn.Module,
    window: int,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    sinks: int = 0,
    sink_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    key_feature_map: str | torch.nn.Module | None = None,
    linear_weight: str = "1-gamma",
) -> torch.Tensor:
    """The quadratic form of `hf_fastattn.ops.hybrid.sliding_window_linear_attention` (same arguments, queries the
    last Nq of N keys, a state and sinks held before `k`): the `[B, H, Nq, N]` weights in fp32."""
    b, h, nq, d = q.shape
    n = k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    fmap = get_feature_map(feature_map)
    kmap = fmap if key_feature_map is None else get_feature_map(key_feature_map)
    qf, kf, vf = q.float(), repeat_kv(k.float(), h), repeat_kv(v.float(), h)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask.bool()
    used = None if sink_kv is None else sink_kv[2].bool().sum(1)
    sink = _sinks_of(real, sinks, used)[:, None, None, :]
    i = torch.arange(n - nq, n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    keep = real[:, None, None, :]
    soft_set = keep & (j <= i) & ((j > i - window) | sink)
    lin_set = keep & (j <= i - window) & ~sink
    scores = (qf @ kf.transpose(-1, -2)) * scaling  # [B, H, Nq, N]
    if sink_kv is not None:  # held sinks: before every key, in every query's softmax set
        sk, sv, smask = sink_kv
        scores = torch.cat([(qf @ repeat_kv(sk.float(), h).transpose(-1, -2)) * scaling, scores], dim=-1)
        vf = torch.cat([repeat_kv(sv.float(), h), vf], dim=2)
        held = smask.bool()[:, None, None, :].expand(b, 1, nq, -1)
        soft_set = torch.cat([held, soft_set.expand(b, 1, nq, n)], dim=-1)
        lin_set = torch.cat([torch.zeros_like(held), lin_set.expand(b, 1, nq, n)], dim=-1)
        kf_lin = torch.cat([torch.zeros_like(repeat_kv(sk.float(), h)), kf], dim=2)
    else:
        kf_lin = kf
    m = scores.masked_fill(~soft_set, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    soft = torch.exp((scores - m).masked_fill(~soft_set, float("-inf")))
    gamma = torch.full((h,), 0.5, device=q.device) if window_factor is None else torch.sigmoid(window_factor.float())
    gamma = gamma.view(1, h, 1, 1)
    lam = 1 - gamma if linear_weight == "1-gamma" else torch.ones_like(gamma)
    phi_q = fmap(qf)
    lin = (phi_q @ kmap(kf_lin).transpose(-1, -2)) * lin_set
    weights = gamma * soft + lam * lin
    num, den = weights @ vf, weights.sum(-1, keepdim=True)
    if initial_state is not None:
        s, z = initial_state
        num = num + lam * (phi_q @ s.float())
        den = den + lam * (phi_q @ z.float()[..., None])
    return (num / den.clamp_min(1e-6)).to(v.dtype)


__all__ = [
    "allowed_mask",
    "fast_normalize",
    "fastmax_weight",
    "hybrid_attention_reference",
    "naive_fast_attention",
    "naive_feature_attention",
    "naive_hybrid_attention",
    "naive_linear_attention",
    "naive_softmax_attention",
    "naive_sparse_attention",
    "naive_weighted_attention",
    "repeat_kv",
    "sparse_pattern_mask",
]
