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

Cost: O(N (C + W + S)) time and memory for chunks of C queries and S sinks (never an N x N matrix). Queries go in
chunks of C; each chunk scores by softmax the band of keys [a - W + 1, a + C) (the chunk's own tokens and the W - 1
before its first, a), by linear attention the part of that band beyond each query's window, and the state of every
key before the band (an exclusive cumulative sum of per-chunk states, as `linear.causal_linear_attention` does), and
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

import torch
import torch.nn.functional as F
from torch import nn

from .common import repeat_kv
from .feature_maps import get_feature_map

_EPS = 1e-6
LINEAR_WEIGHTS = ("1-gamma", "1")
# fp32 elements of the per-segment intermediates (scores, states); segments bound the memory of a no-grad prefill
_SEGMENT_BUDGET = 1 << 23
# position given to sinks held outside `k` (a decoder's sink slots): before every key, so beyond every window
_FAR_PAST = -(1 << 40)

SinkKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_hybrid_options(window: int, sinks: int = 0, linear_weight: str = "1-gamma") -> None:
    """Raise a ValueError naming the bad value and what is valid."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if linear_weight not in LINEAR_WEIGHTS:
        raise ValueError(f"linear_weight must be one of {list(LINEAR_WEIGHTS)}, got {linear_weight!r}")


def _gamma(window_factor: torch.Tensor | None, h: int, device) -> torch.Tensor:
    if window_factor is None:
        return torch.full((h,), 0.5, device=device)
    return torch.sigmoid(window_factor.float())


def _linear_scale(gamma: torch.Tensor, linear_weight: str) -> torch.Tensor:
    return 1 - gamma if linear_weight == "1-gamma" else torch.ones_like(gamma)


def sink_positions(mask: torch.Tensor, sinks: int, used: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, N]` bool: which keys are sinks, the first `sinks` real keys (True in `mask` `[B, N]`) of each row after
    `used` `[B]` sinks already seen before them."""
    rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1
    if used is not None:
        rank = rank + used.to(torch.int64)[:, None]
    return mask & (rank < sinks)


def _take(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """x[:, :, start : start + length] along dim 2, zero-padded where the range leaves [0, N)."""
    n = x.shape[2]
    lo, hi = max(start, 0), min(start + length, n)
    part = x[:, :, lo:hi]
    before, after = lo - start, start + length - hi
    if before or after:
        pad = [0, 0] * (x.dim() - 3) + [before, after]
        part = F.pad(part, pad)
    return part


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
    sinks: int = 0,
    sink_kv: SinkKV | None = None,
    key_feature_map: str | nn.Module | None = None,
    linear_weight: str = "1-gamma",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal hybrid attention (see the module docstring) in O(N (C + W + sinks)); queries are the last Nq of the N
    key positions.

    Args:
        q: `[B, H, Nq, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H, Nq <= N.
        feature_map: the map phi of the linear part ("elu", "relu" or a module; per-head modules see H heads); the
            queries' map when `key_feature_map` is given.
        window: W >= 1, keys i - W < j <= i get softmax weights.
        window_factor: `[H]` logits of gamma (None: gamma = 1/2).
        scaling: softmax scale, default D ** -0.5.
        padding_mask: `[B, N]` bool, True for real tokens.
        initial_state: (S `[B, H, F, Dv]`, z `[B, H, F]`): keys before the first of `k`, already beyond every
            query's window, as `fold_window_state` makes it (None: there are none).
        sinks: the first `sinks` real keys of each row get softmax weights for every later query (0: none).
        sink_kv: sinks before the first of `k` (keys `[B, Hkv, S, D]`, values `[B, Hkv, S, Dv]`, mask `[B, S]`, False
            for an empty slot), as a decoder holds them; the keys of `k` fill the sink slots left.
        key_feature_map: the keys' map phi_k (None: `feature_map` for both).
        linear_weight: "1-gamma" or "1", the linear part's weight (see the module docstring).
        chunk_size: C, queries per chunk (None: 64).

    Returns:
        `[B, H, Nq, Dv]` in v's dtype.
    """
    check_hybrid_options(window, sinks, linear_weight)
    b, h, nq, d = q.shape
    n, dv = k.shape[2], v.shape[-1]
    if nq > n:
        raise ValueError(f"{nq} queries against {n} keys: queries must be the last positions of the keys")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in batch, heads or length")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    scaling = d**-0.5 if scaling is None else scaling
    phi_q_map = get_feature_map(feature_map)
    phi_k_map = phi_q_map if key_feature_map is None else get_feature_map(key_feature_map)
    qf, kf, vf = q.float(), repeat_kv(k.float(), h), repeat_kv(v.float(), h)
    mask = (
        torch.ones(b, n, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask.to(torch.bool)
    )
    used = None if sink_kv is None else sink_kv[2].to(torch.bool).sum(1)
    is_sink = sink_positions(mask, sinks, used) if sinks else torch.zeros_like(mask)
    gamma = _gamma(window_factor, h, q.device)
    lam = _linear_scale(gamma, linear_weight)
    # the linear part's keys: real, not sinks (zero features otherwise); v gets a column of ones for the denominators
    phi_k = phi_k_map(kf) * (mask & ~is_sink)[:, None, :, None]
    v1 = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)
    phi_q = phi_q_map(qf)
    sink_k, sink_v1, sink_pos = _sink_set(kf, v1, is_sink, sinks, sink_kv, h)

    # the linear state before the first query's band: the initial state plus the keys j <= p0 - W
    p0 = n - nq
    state = None
    if initial_state is not None:
        s0, z0 = initial_state
        state = torch.cat([s0.float(), z0.float().unsqueeze(-1)], dim=-1)  # [B, H, F, Dv + 1]
    first = max(0, p0 - window + 1)
    if first:
        folded = phi_k[:, :, :first].transpose(-1, -2) @ v1[:, :, :first]
        state = folded if state is None else state + folded

    c = min(64 if chunk_size is None else chunk_size, max(nq, 1))
    f = phi_q.shape[-1]
    per_query = b * h * (c + window + sink_k.shape[2] + 2 * f + f * (dv + 1) / c)
    seg = max(c, int(_SEGMENT_BUDGET / per_query) // c * c)
    outs = []
    for s in range(0, nq, seg):
        e = min(nq, s + seg)
        out, state = _segment(
            qf[:, :, s:e], phi_q[:, :, s:e], kf, v1, phi_k, mask, p0 + s, e - s, c, window, scaling, state,
            gamma, lam, sink_k, sink_v1, sink_pos,
        )
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return (out[..., :dv] / out[..., dv:].clamp_min(_EPS)).to(v.dtype)


def _sink_set(kf, v1, is_sink, sinks, sink_kv, h):
    """The sinks as separate keys: those held before `k` (`sink_kv`) and those inside it. Returns keys `[B, H, S', D]`,
    values with the ones column `[B, H, S', Dv + 1]` (zero rows for empty slots) and positions `[B, S']` (None where
    an empty slot: no sinks)."""
    b = kf.shape[0]
    keys, values, positions = [], [], []
    if sink_kv is not None:
        sk, sv, smask = sink_kv
        smask = smask.to(torch.bool)
        sv1 = torch.cat([repeat_kv(sv.float(), h), torch.ones_like(repeat_kv(sv.float(), h)[..., :1])], dim=-1)
        keys.append(repeat_kv(sk.float(), h))
        values.append(sv1 * smask[:, None, :, None])
        positions.append(torch.where(smask, _FAR_PAST, -_FAR_PAST).to(torch.int64).expand(b, -1))
    inside = min(sinks, kf.shape[2])
    if inside:
        # the positions of each row's sinks first (a stable sort of "not a sink"), padded with non-sinks
        idx = torch.sort((~is_sink).to(torch.int8), dim=1, stable=True).indices[:, :inside]
        valid = is_sink.gather(1, idx)
        gather = idx[:, None, :, None]
        keys.append(kf.gather(2, gather.expand(b, h, inside, kf.shape[-1])))
        values.append(v1.gather(2, gather.expand(b, h, inside, v1.shape[-1])) * valid[:, None, :, None])
        # a slot that holds no sink gets a position after every query: never attended
        positions.append(torch.where(valid, idx, -_FAR_PAST))
    if not keys:
        return kf.new_zeros(b, h, 0, kf.shape[-1]), v1.new_zeros(b, h, 0, v1.shape[-1]), None
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(positions, dim=1)


def _segment(q, phi_q, kf, v1, phi_k, mask, a0, length, c, window, scaling, state, gamma, lam, sink_k, sink_v1,
             sink_pos):
    """Queries at positions [a0, a0 + length) (q `[B, H, L, D]`, phi_q its features), `state` `[B, H, F, Dv + 1]` of
    the linear keys before a0 - W + 1 (or None). Returns (numerator | denominator `[B, H, L, Dv + 1]`, the state of
    the linear keys before a0 + L - W + 1)."""
    b, h, _, d = q.shape
    nc = -(-length // c)
    pad = nc * c - length
    band = c + window - 1
    start = a0 - window + 1
    # the keys of every chunk's band: [a0 + i C - W + 1, a0 + (i + 1) C), zero-padded outside the sequence
    ks, v1s, pks = (_take(x, start, nc * c + window - 1) for x in (kf, v1, phi_k))
    keep = _take(mask[:, None, :, None], start, nc * c + window - 1)[:, 0, :, 0]  # [B, len]
    k_band = ks.unfold(2, band, c)  # [B, H, nc, D, band]
    v_band = v1s.unfold(2, band, c).transpose(-1, -2)  # [B, H, nc, band, Dv + 1]
    keep_band = keep.unfold(1, band, c)[:, None, :, None, :]  # [B, 1, nc, 1, band]
    qc = F.pad(q, (0, 0, 0, pad)).reshape(b, h, nc, c, d)
    pqc = F.pad(phi_q, (0, 0, 0, pad)).reshape(b, h, nc, c, -1)
    r = torch.arange(c, device=q.device)[:, None]
    t = torch.arange(band, device=q.device)[None, :]
    in_window = (t >= r) & (t < r + window)  # query r of a chunk, band key t: i - j = r + W - 1 - t
    soft = in_window & keep_band
    scores = (qc @ k_band) * scaling  # [B, H, nc, C, band]
    m = scores.masked_fill(~soft, float("-inf")).amax(-1, keepdim=True)
    if sink_pos is not None:
        pos = a0 + torch.arange(nc * c, device=q.device).view(1, nc, c, 1)
        # a sink counts here when beyond the query's window (inside it, the band has it)
        sink_ok = (sink_pos[:, None, None, :] <= pos - window)[:, None]  # [B, 1, nc, C, S]
        sink_scores = (qc @ sink_k.transpose(-1, -2).unsqueeze(2)) * scaling  # [B, H, nc, C, S]
        m = torch.maximum(m, sink_scores.masked_fill(~sink_ok, float("-inf")).amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # masked before exp: a score outside the softmax set may exceed its max by enough to overflow (inf * 0)
    out = torch.exp((scores - m).masked_fill(~soft, float("-inf"))) @ v_band
    if sink_pos is not None:
        out = out + torch.exp((sink_scores - m).masked_fill(~sink_ok, float("-inf"))) @ sink_v1.unsqueeze(2)
    g = gamma.view(1, h, 1, 1, 1)
    # linear part: the state before each chunk's band (exclusive cumulative sum of the chunks' first C band keys) and,
    # inside the band, keys j <= i - W (band index t < r) whose features are not zeroed
    pk_blocks = pks[:, :, : nc * c].reshape(b, h, nc, c, -1)
    v_blocks = v1s[:, :, : nc * c].reshape(b, h, nc, c, -1)
    kv = pk_blocks.transpose(-1, -2) @ v_blocks  # [B, H, nc, F, Dv + 1]
    states = torch.cat([torch.zeros_like(kv[:, :, :1]), torch.cumsum(kv, dim=2)], dim=2)
    if state is not None:
        states = states + state.unsqueeze(2)
    lin = pqc @ states[:, :, :-1] + (pqc @ pk_blocks.transpose(-1, -2)).tril(-1) @ v_blocks
    out = g * out + lam.view(1, h, 1, 1, 1) * lin
    return out.reshape(b, h, nc * c, -1)[:, :, :length], states[:, :, -1]


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
