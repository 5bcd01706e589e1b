"""The chunked forward of the LoLCATs hybrid, `sliding_window_linear_attention`: O(N (C + W + S)) time and memory,
never an N x N matrix (the weights and the measurements are in `hybrid.py`'s docstring, the family's home). Split from
`hybrid.py` (one family, two files): this is the chunked arithmetic, `hybrid.py` the state-in / state-out entry point
and the decoding steps on a held window, sinks and linear state.
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

    # the linear part at once where the C++ kernel applies (a whole sequence without a carried state): keys
    # j <= i - W as a causal product against the features and values shifted W positions later
    lin = None
    if p0 == 0 and state is None and nq > 0:
        lin = _lagged_products(phi_q, phi_k, vf, window)

    c = min(64 if chunk_size is None else chunk_size, max(nq, 1))
    f = phi_q.shape[-1]
    per_query = b * h * (c + window + sink_k.shape[2] + 2 * f + f * (dv + 1) / c)
    seg = max(c, int(_SEGMENT_BUDGET / per_query) // c * c)
    outs = []
    for s in range(0, nq, seg):
        e = min(nq, s + seg)
        out, state = _segment(
            qf[:, :, s:e], phi_q[:, :, s:e], kf, v1, phi_k, mask, p0 + s, e - s, c, window, scaling, state,
            gamma, lam, sink_k, sink_v1, sink_pos, None if lin is None else lin[:, :, s:e],
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


def _lagged_products(phi_q, phi_k, v, window: int) -> torch.Tensor | None:
    """The linear part sum_{j <= i - W} phi_q_i . phi_k_j [v_j | 1] for every query of a whole sequence,
    `[B, H, N, Dv + 1]`, through the C++ kernel (`linear_cpu.linear_products`); None where it does not apply."""
    from .linear_cpu import linear_products

    b, h, n, f = phi_q.shape
    shifted_k, shifted_v = (F.pad(x, (0, 0, window, 0))[:, :, :n] for x in (phi_k, v))
    out = linear_products(
        phi_q.reshape(b * h, n, f), shifted_k.reshape(b * h, n, f), shifted_v.reshape(b * h, n, v.shape[-1])
    )
    return None if out is None else out.view(b, h, n, -1)


def _segment(q, phi_q, kf, v1, phi_k, mask, a0, length, c, window, scaling, state, gamma, lam, sink_k, sink_v1,
             sink_pos, lin=None):
    """Queries at positions [a0, a0 + length) (q `[B, H, L, D]`, phi_q its features), `state` `[B, H, F, Dv + 1]` of
    the linear keys before a0 - W + 1 (or None). Returns (numerator | denominator `[B, H, L, Dv + 1]`, the state of
    the linear keys before a0 + L - W + 1). `lin`: the linear part of these queries already computed
    (`_lagged_products`; no state is then returned)."""
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
    if lin is not None:
        lin = F.pad(lin, (0, 0, 0, pad)).reshape(b, h, nc, c, -1)
        return (g * out + lam.view(1, h, 1, 1, 1) * lin).reshape(b, h, nc * c, -1)[:, :, :length], None
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
