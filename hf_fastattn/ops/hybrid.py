"""LoLCATs hybrid attention: softmax over a sliding window of the last W keys (and the first `sinks` keys), linear
attention beyond.

For query i (causal), with gamma = sigmoid(window_factor) per head, s_ij = q_i . k_j * scaling, the softmax set
A_i = {j : i - W < j <= i} plus the sinks (the first `sinks` real keys of the row, StreamingLLM's attention sinks;
a sink inside the window is counted once), and m_i the largest s_ij over A_i:

    w_ij = gamma * exp(s_ij - m_i)                 for j in A_i
    w_ij = lambda * phi_q(q_i) . phi_k(k_j)        for j <= i - W, j not a sink
    out_i = sum_j w_ij v_j / sum_j w_ij

lambda, the linear part's weight (`linear_weight`), is 1 - gamma ("1-gamma", the default: the two parts are a convex
mix of unnormalized weights) or 1 ("1", LoLCATs' own form: its `affine_attention_factors=False` default adds the linear
weights unscaled). phi_q and phi_k are one map (the default) or two (`key_feature_map`, LoLCATs' separate maps).

Cost (`hybrid_chunked.py`): O(N (C + W + S)) time and memory for chunks of C queries and S sinks (never an N x N
matrix). Queries go in chunks of C; each chunk scores by softmax the band of keys [a - W + 1, a + C) (the chunk's own
tokens and the W - 1 before its first, a), by linear attention the part of that band beyond each query's window, and
the state of every key before the band (an exclusive cumulative sum of per-chunk states, as `linear.causal_linear_attention` does), and
the sinks. The naive quadratic form is `hf_fastattn.ops.reference.hybrid_attention_reference` (tests only). Measured
by the sizes of the tensors allocated in a forward and backward (1 x 2 heads x N x 16, window 16, 4 sinks): 13, 26,
53, 106 MiB in all for N = 512 ... 4096 (largest 0.3 ... 2.5 MiB), where the quadratic form allocates 52, 201, 794 MiB
for N = 512 ... 2048 (largest 2 ... 32 MiB).

Sinks (default 4 in the "linear" options and the conversion options): on SmolLM2-135M, untrained, 4096 held-out
tinyshakespeare tokens in windows of 2048 (`benchmarks/bench_hybrid_sinks.py`, 1 thread), sdpa scores perplexity
29.41; the softmax part alone (window 64, gamma 1) 326.94 with no sinks and 49.95 / 49.92 / 49.72 with 1 / 4 / 8: the
first tokens carry what the window misses (StreamingLLM), most of it the first token alone. The untrained hybrid
(gamma 1/2, elu+1) is about 2550 with any number of sinks, its untrained linear part dominating.

m_i depends only on query i and its own softmax set, so any chunking (or a decoder holding the last W keys, the sinks
and a linear state) computes the same numbers: `initial_state` (S, z) adds the keys folded in before the given ones to
the linear part, `sink_kv` the sinks among them, and `leave_window` moves keys that left the window into the sinks or
the state (decoding with `hf_fastattn.RecurrentCache`; one token at a time, `hybrid_decode_step` does both with fewer
operations).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .common import repeat_kv
from .feature_maps import get_feature_map
from .hybrid_chunked import (  # noqa: F401  (re-exported: the chunked forward's names, their home before the split)
    _EPS,
    LINEAR_WEIGHTS,
    SinkKV,
    _gamma,
    _linear_scale,
    check_hybrid_options,
    sink_positions,
    sliding_window_linear_attention,
)


class HybridState(NamedTuple):
    """What the hybrid keeps between calls (a decoder's cache): the last `window` keys, values and padding mask
    (`[B, Hkv, W, D]`, `[B, Hkv, W, Dv]`, `[B, W]`, empty slots False), the linear state (S `[B, H, F, Dv]`,
    z `[B, H, F]`) of the keys that left the window (None before any did), and the sink slots (`SinkKV`, None: no
    sinks)."""

    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    linear: tuple[torch.Tensor, torch.Tensor] | None
    sinks: SinkKV | None


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
    left out). Kept per query head (`num_heads`), as `sliding_window_linear_attention` computes. `feature_map` is the
    keys' map (phi_k)."""
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


def empty_sinks(k: torch.Tensor, v: torch.Tensor, sinks: int) -> SinkKV:
    """`sinks` empty sink slots (zeros, mask False) for keys like `k` `[B, Hkv, *, D]` and values like `v`."""
    b, hkv = k.shape[:2]
    return (k.new_zeros(b, hkv, sinks, k.shape[-1]), v.new_zeros(b, hkv, sinks, v.shape[-1]),
            torch.zeros(b, sinks, dtype=torch.bool, device=k.device))


def leave_window(
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    feature_map: str | nn.Module,
    num_heads: int,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    sink_kv: SinkKV | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], SinkKV | None]:
    """Keys `k` `[B, Hkv, L, D]` (values `v`, padding mask `[B, L]`) that just left the window of every later query:
    while a row's sink slots (`sink_kv`, None: no sinks) are not full, its real keys take them in order; the rest are
    folded into the linear `state` with the keys' map `feature_map` (`fold_window_state`).

    Returns:
        (the new state, the new sink slots or None).
    """
    mask = mask.to(torch.bool)
    if sink_kv is not None and sink_kv[0].shape[2]:
        sk, sv, smask = sink_kv
        slots = sk.shape[2]
        rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1 + smask.sum(1, keepdim=True)
        to_sink = mask & (rank < slots)
        # one-hot [B, L, S]: key l goes to slot rank(l); empty slots hold zeros, so adding fills them
        place = (to_sink[:, :, None] & (rank[:, :, None] == torch.arange(slots, device=k.device))).to(sk.dtype)
        sk = sk + torch.einsum("bls,bhld->bhsd", place, k.to(sk.dtype))
        sv = sv + torch.einsum("bls,bhld->bhsd", place.to(sv.dtype), v.to(sv.dtype))
        sink_kv = (sk, sv, smask | place.bool().any(1))
        mask = mask & ~to_sink
    state = fold_window_state(k, v, feature_map=feature_map, num_heads=num_heads, padding_mask=mask, state=state)
    return state, sink_kv


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
    sink_kv: SinkKV | None = None,
    key_feature_map: str | nn.Module | None = None,
    linear_weight: str = "1-gamma",
):
    """One decoding step of the hybrid for a single new token, the same numbers as `sliding_window_linear_attention`
    with fewer operations: the oldest of the `window` stored keys leaves the window (into a free sink slot, or folded
    into the state), the new token's key joins the window, and the new query attends to the sinks, the window and the
    state.

    Args:
        q: `[B, H, 1, D]`. k, v: `[B, Hkv, 1, D]` / `[B, Hkv, 1, Dv]`, the new token's. mask: `[B, 1]` bool.
        window_kv: the last `window` keys `[B, Hkv, W, D]`, values and padding mask `[B, W]` (empty slots False).
        state: (S `[B, H, F, Dv]`, z `[B, H, F]`) of the keys before them, sinks excepted.
        sink_kv: the sink slots (keys `[B, Hkv, S, D]`, values, mask `[B, S]`), sinks that left the window; None: the
            model has no sinks.
        key_feature_map, linear_weight: as in `sliding_window_linear_attention`.

    Returns:
        (output `[B, H, 1, Dv]` in v's dtype, the new window (keys, values, mask), the new state), and the new sink
        slots as a fourth item when `sink_kv` is given.
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
    check_hybrid_options(max(wk.shape[2], 1), 0, linear_weight)
    h, d = q.shape[1], q.shape[-1]
    scaling = d**-0.5 if scaling is None else scaling
    phi_k = get_feature_map(feature_map if key_feature_map is None else key_feature_map)
    new_state, new_sinks = leave_window(
        wk[:, :, :1], wv[:, :, :1], wmask[:, :1], feature_map=phi_k, num_heads=h, state=state, sink_kv=sink_kv
    )
    wk, wv = torch.cat([wk[:, :, 1:], k], dim=2), torch.cat([wv[:, :, 1:], v], dim=2)
    wmask = torch.cat([wmask[:, 1:], mask.to(torch.bool)], dim=1)
    # the softmax keys: the sinks that left the window, then the window (its slots hold no sink twice)
    keys, values, keep = wk, wv, wmask
    if new_sinks is not None:
        keys, values = torch.cat([new_sinks[0], wk], dim=2), torch.cat([new_sinks[1], wv], dim=2)
        keep = torch.cat([new_sinks[2], wmask], dim=1)
    qf32 = q.float()
    scores = (qf32 @ repeat_kv(keys.float(), h).transpose(-1, -2)) * scaling  # [B, H, 1, S + W]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    soft = torch.exp(scores - m)
    gamma = _gamma(window_factor, h, q.device).view(1, h, 1, 1)
    lam = _linear_scale(gamma, linear_weight)
    phi_q = get_feature_map(feature_map)(qf32)
    s, z = new_state
    num = gamma * (soft @ repeat_kv(values.float(), h)) + lam * (phi_q @ s)
    den = gamma * soft.sum(-1, keepdim=True) + lam * (phi_q @ z[..., None])
    out = (num / den.clamp_min(_EPS)).to(v.dtype)
    if sink_kv is None:
        return out, (wk, wv, wmask), new_state
    return out, (wk, wv, wmask), new_state, new_sinks


def empty_hybrid_state(k: torch.Tensor, v: torch.Tensor, window: int, sinks: int = 0) -> HybridState:
    """The state before any token, for keys like `k` `[B, Hkv, *, D]` and values like `v`: `window` empty window
    slots (masked out) and `sinks` empty sink slots, so the bytes held never change afterwards."""
    b, hkv = k.shape[:2]
    slots = (k.new_zeros(b, hkv, window, k.shape[-1]), v.new_zeros(b, hkv, window, v.shape[-1]),
             torch.zeros(b, window, dtype=torch.bool, device=k.device))
    return HybridState(slots, None, empty_sinks(k, v, sinks) if sinks else None)


def hybrid_attention_with_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | nn.Module,
    window: int,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
    padding_mask: torch.Tensor | None = None,
    sinks: int = 0,
    key_feature_map: str | nn.Module | None = None,
    linear_weight: str = "1-gamma",
    chunk_size: int | None = None,
    initial_state: HybridState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, HybridState | None]:
    """The hybrid with state in and out: the family's one entry point (PyTorch only: no Triton kernel yet).

    Without a state in or out this is `sliding_window_linear_attention` on `q`, `k`, `v`. With one (None in and a
    state out starts from `empty_hybrid_state`), the new tokens (queries and keys alike, `q` `[B, H, N, D]`, `k`
    `[B, Hkv, N, D]`) attend to the held sinks, window and linear state and to each other, exactly as in the full
    forward; one token against a state takes `hybrid_decode_step`. Then the keys now more than `window` tokens back
    take the free sink slots or are folded into the linear state, and the last `window` keys form the new window.

    Args:
        feature_map, window, window_factor, scaling, sinks, key_feature_map, linear_weight, chunk_size: as in
            `sliding_window_linear_attention`; `sinks` is the number of sink slots of the state.
        padding_mask: `[B, N]` bool for the new keys, True for real tokens (None: all real).
        initial_state: a `HybridState`, or None.
        output_final_state: also return the state after the new tokens.

    Returns:
        `(out [B, H, N, Dv]` in v's dtype, the new `HybridState` or None`)`.
    """
    options = dict(window_factor=window_factor, scaling=scaling, linear_weight=linear_weight)
    if initial_state is None and not output_final_state:
        out = sliding_window_linear_attention(
            q, k, v, feature_map=feature_map, window=window, padding_mask=padding_mask, sinks=sinks,
            key_feature_map=key_feature_map, chunk_size=chunk_size, **options,
        )
        return out, None
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"with a state the new tokens are queries and keys alike, got {q.shape[2]} and {k.shape[2]}")
    mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if padding_mask is None else padding_mask
    mask = mask.to(torch.bool)
    state = empty_hybrid_state(k, v, window, sinks) if initial_state is None else initial_state
    key_map = feature_map if key_feature_map is None else key_feature_map
    if k.shape[2] == 1 and state.linear is not None:  # one decoding step
        out, kept, linear, *held = hybrid_decode_step(
            q, k, v, mask, state.window, state.linear, feature_map=feature_map, sink_kv=state.sinks,
            key_feature_map=key_map, **options,
        )
        return out, HybridState(kept, linear, held[0] if held else None)
    old_k, old_v, old_mask = state.window
    keys, values = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
    mask = torch.cat([old_mask, mask], dim=1)
    out = sliding_window_linear_attention(
        q, keys, values, feature_map=feature_map, window=window, padding_mask=mask, initial_state=state.linear,
        sinks=sinks, sink_kv=state.sinks, key_feature_map=key_map, chunk_size=chunk_size, **options,
    )
    leaving = keys.shape[2] - window  # the oldest keys: beyond the window of every later query
    linear, sink_kv = leave_window(
        keys[:, :, :leaving], values[:, :, :leaving], mask[:, :leaving], feature_map=key_map, num_heads=q.shape[1],
        state=state.linear, sink_kv=state.sinks,
    )
    kept = (keys[:, :, leaving:], values[:, :, leaving:], mask[:, leaving:])
    return out, HybridState(kept, linear, sink_kv)
