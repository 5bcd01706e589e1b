"""LoLCATs hybrid attention: softmax over a sliding window of the last W keys, linear attention beyond it.

For query i (causal), with m_i the largest window score and gamma = sigmoid(window_factor) per head:

    w_ij = gamma * exp(s_ij - m_i)               for i - W < j <= i      (s_ij = q_i . k_j * scaling)
    w_ij = (1 - gamma) * phi(q_i) . phi(k_j)     for j <= i - W
    out_i = sum_j w_ij v_j / sum_j w_ij

m_i depends only on query i and its own window, so any chunking (or a decoder holding the last W keys and a
linear state) computes the same numbers: `initial_state` (S, z) adds the keys folded in before the given ones to
the linear part, and `fold_window_state` moves keys that left the window into such a state (decoding with
`hf_fastattn.RecurrentCache`; one token at a time, `hybrid_decode_step` does both with fewer operations). This form materializes the Nq x N weights (O(N^2) memory): it is meant for
the short sequences of conversion and uptraining, where LoLCATs trains with the same quadratic form.
"""

from __future__ import annotations

import torch
from torch import nn

from .feature_maps import get_feature_map
from .reference import repeat_kv

_EPS = 1e-6


def sliding_window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | nn.Module,
    window: int,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal hybrid attention (see the module docstring); queries are the last Nq of the N key positions.

    Args:
        q: `[B, H, Nq, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H, Nq <= N.
        feature_map: the map phi of the linear part ("elu", "relu" or a module; per-head modules see H heads).
        window: W >= 1, keys i - W < j <= i get softmax weights.
        window_factor: `[H]` logits of gamma (None: gamma = 1/2).
        scaling: softmax scale, default D ** -0.5.
        padding_mask: `[B, N]` bool, True for real tokens.
        initial_state: (S `[B, H, F, Dv]`, z `[B, H, F]`): keys before the first of `k`, already beyond every
            query's window, as `fold_window_state` makes it (None: there are none).

    Returns:
        `[B, H, Nq, Dv]` in v's dtype.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    b, h, nq, d = q.shape
    n = k.shape[2]
    if nq > n:
        raise ValueError(f"{nq} queries against {n} keys: queries must be the last positions of the keys")
    scaling = d**-0.5 if scaling is None else scaling
    qf32, kf32, vf32 = q.float(), repeat_kv(k.float(), h), repeat_kv(v.float(), h)
    i = torch.arange(n - nq, n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    in_window = (j <= i) & (j > i - window)  # [Nq, N]
    beyond = j <= i - window
    in_window, beyond = in_window[None, None], beyond[None, None]
    if padding_mask is not None:
        keep = padding_mask[:, None, None, :].to(torch.bool)
        in_window, beyond = in_window & keep, beyond & keep
    scores = (qf32 @ kf32.transpose(-1, -2)) * scaling  # [B, H, Nq, N]
    m = scores.masked_fill(~in_window, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # masked before exp: a score outside the window may exceed the window's max by enough to overflow (inf * 0)
    soft = torch.exp((scores - m).masked_fill(~in_window, float("-inf")))
    gamma = (
        torch.full((h,), 0.5, device=q.device)
        if window_factor is None
        else torch.sigmoid(window_factor.float())
    )
    gamma = gamma.view(1, h, 1, 1)
    weights = gamma * soft
    num, den = weights @ vf32, weights.sum(-1, keepdim=True)
    phi = get_feature_map(feature_map)
    phi_q = phi(qf32)
    beyond_keys = max(0, n - window)  # keys beyond the last query's window (earlier queries: a prefix of them)
    if beyond_keys:
        lin = (phi_q @ phi(kf32[:, :, :beyond_keys]).transpose(-1, -2)) * beyond[..., :beyond_keys]
        lin = (1 - gamma) * lin
        num, den = num + lin @ vf32[:, :, :beyond_keys], den + lin.sum(-1, keepdim=True)
    if initial_state is not None:
        s, z = initial_state
        num = num + (1 - gamma) * (phi_q @ s.float())
        den = den + (1 - gamma) * (phi_q @ z.float()[..., None])
    return (num / den.clamp_min(_EPS)).to(v.dtype)


def fold_window_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | nn.Module,
    num_heads: int,
    padding_mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear state (S `[B, H, F, Dv]`, z `[B, H, F]`) of `state` plus keys `k` `[B, Hkv, N, D]` and values `v`
    `[B, Hkv, N, Dv]` that have left every later query's window (padded keys, False in `padding_mask` `[B, N]`, are
    left out). Kept per query head (`num_heads`), as `sliding_window_linear_attention` computes."""
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in batch, heads or length")
    phi = get_feature_map(feature_map)
    kf = phi(repeat_kv(k.float(), num_heads))
    if padding_mask is not None:
        kf = kf * padding_mask[:, None, :, None].to(kf.dtype)
    s, z = kf.transpose(-1, -2) @ repeat_kv(v.float(), num_heads), kf.sum(2)
    if state is not None:
        s, z = state[0] + s, state[1] + z
    return s, z


def hybrid_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    window_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    state: tuple[torch.Tensor, torch.Tensor],
    *,
    feature_map: str | nn.Module,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
):
    """One decoding step of the hybrid for a single new token, the same numbers as `sliding_window_linear_attention`
    with fewer operations: the oldest of the `window` stored keys leaves the window and is folded into the state, the
    new token's key joins the window, and the new query attends to both.

    Args:
        q: `[B, H, 1, D]`. k, v: `[B, Hkv, 1, D]` / `[B, Hkv, 1, Dv]`, the new token's. mask: `[B, 1]` bool.
        window_kv: the last `window` keys `[B, Hkv, W, D]`, values and padding mask `[B, W]` (empty slots False).
        state: (S `[B, H, F, Dv]`, z `[B, H, F]`) of the keys before them.

    Returns:
        (output `[B, H, 1, Dv]` in v's dtype, the new window (keys, values, mask), the new state).
    """
    wk, wv, wmask = window_kv
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(
            f"hybrid_decode_step takes one new token, got {q.shape[2]} queries and {k.shape[2]} keys: "
            "use sliding_window_linear_attention with initial_state for several"
        )
    if wk.shape[:2] != k.shape[:2] or wmask.shape != (wk.shape[0], wk.shape[2]):
        raise ValueError(
            f"the stored window (keys {tuple(wk.shape)}, mask {tuple(wmask.shape)}) does not match the new key "
            f"{tuple(k.shape)} in batch or K/V heads"
        )
    h, d = q.shape[1], q.shape[-1]
    scaling = d**-0.5 if scaling is None else scaling
    state = fold_window_state(
        wk[:, :, :1], wv[:, :, :1], feature_map=feature_map, num_heads=h, padding_mask=wmask[:, :1], state=state
    )
    wk, wv = torch.cat([wk[:, :, 1:], k], dim=2), torch.cat([wv[:, :, 1:], v], dim=2)
    wmask = torch.cat([wmask[:, 1:], mask.to(torch.bool)], dim=1)
    qf32 = q.float()
    keep = wmask[:, None, None, :]
    scores = (qf32 @ repeat_kv(wk.float(), h).transpose(-1, -2)) * scaling  # [B, H, 1, W]
    scores = scores.masked_fill(~keep, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    soft = torch.exp(scores - m)
    gamma = torch.full((h,), 0.5, device=q.device) if window_factor is None else torch.sigmoid(window_factor.float())
    gamma = gamma.view(1, h, 1, 1)
    phi_q = get_feature_map(feature_map)(qf32)
    s, z = state
    num = gamma * (soft @ repeat_kv(wv.float(), h)) + (1 - gamma) * (phi_q @ s)
    den = gamma * soft.sum(-1, keepdim=True) + (1 - gamma) * (phi_q @ z[..., None])
    return (num / den.clamp_min(_EPS)).to(v.dtype), (wk, wv, wmask), state

