"""Sparse softmax attention with the fixed and strided patterns of Child et al. 2019 ("Sparse Transformers").

Both heads of the paper are merged into one allowed set per query i (and j <= i when causal):
- "strided": |i - j| < local (default: stride) or |i - j| a multiple of stride;
- "fixed":   j in the same block of `stride` tokens as i, or j one of the last `summary` tokens of a block.

Neither pattern is block-sparse at the token level (every 128-token block holds some strided key), so
`flex_attention` block masks barely skip anything on CPU (0.6x dense SDPA at N=16K, see NOTES). Instead each
pattern is split into two dense pieces whose union is the allowed set and whose intersection is empty:
- strided: a band |i - j| < local (blocks of `local` tokens against their neighbours) plus the periodic keys
  j = i mod stride, |i - j| >= local (queries and keys regrouped by residue, one small attention per residue);
- fixed: the block-diagonal part plus the summary keys of the other blocks (gathered).
The two softmax pieces are merged by their log-sum-exp. Cost O(N (N / stride + stride) D), memory likewise.

Attention dropout (`dropout_p`) is sdpa's: every normalized weight is dropped on its own with probability p and the
kept ones are scaled by 1 / (1 - p). A piece's weights are exp(s_ij - lse_piece) and the merge rescales them by
exp(lse_piece - lse), so dropping a piece's weights (its log-sum-exp left as it was) drops the final weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import repeat_kv, sparse_pattern_mask, sparse_pattern_rows, use_triton
from .dropout import check_dropout_p

SPARSE_PATTERNS = ("strided", "fixed")


@dataclass(frozen=True)
class SparsePattern:
    """A validated Child et al. pattern; `local` defaults to `stride`."""

    pattern: str = "strided"
    stride: int = 128
    local: int | None = None
    summary: int = 1

    def __post_init__(self):
        if self.pattern not in SPARSE_PATTERNS:
            raise ValueError(f"sparse attention: pattern must be one of {SPARSE_PATTERNS}, got {self.pattern!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"sparse attention: stride must be a positive int, got {self.stride!r}")
        if self.local is not None and (not isinstance(self.local, int) or self.local < 1):
            raise ValueError(f"sparse attention: local must be a positive int or None, got {self.local!r}")
        if not isinstance(self.summary, int) or not 1 <= self.summary <= self.stride:
            raise ValueError(f"sparse attention: summary must be an int in [1, stride={self.stride}], got {self.summary!r}")

    @property
    def window(self) -> int:
        return self.stride if self.local is None else self.local


def _masked_part(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0):
    """Softmax piece over `allowed` entries: returns (normalized out, log-sum-exp); empty rows give (0, -inf).
    With `dropout_p`, the weights are dropped before they meet v; the log-sum-exp counts every weight."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [..., Nq, 1]
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v, lse


def _merge(out_a, lse_a, out_b, lse_b):
    """Combine two softmax pieces over disjoint key sets by their log-sum-exp weights."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return out_a * torch.exp(lse_a - safe) + out_b * torch.exp(lse_b - safe)


def _pad_to(x: torch.Tensor, multiple: int, dim: int = 2) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _band(q, k, v, valid, window: int, causal: bool, scale: float, dropout_p: float = 0.0):
    """Softmax piece over |i - j| < window: blocks of `window` queries against their own and neighbour blocks."""
    b, h, n, _ = q.shape
    w = window
    qp, kp, vp = (_pad_to(x, w) for x in (q, k, v))
    validp = _pad_to(valid, w, dim=1)
    nb = qp.shape[2] // w
    # keys of blocks b-1, b (and b+1 when bidirectional) for every query block
    offsets = (-1, 0) if causal else (-1, 0, 1)
    kpad = F.pad(kp, (0, 0, w, w))
    vpad = F.pad(vp, (0, 0, w, w))
    mpad = F.pad(validp, (w, w))
    keys = torch.cat([kpad[:, :, (o + 1) * w : (o + 1) * w + nb * w].reshape(b, h, nb, w, -1) for o in offsets], 3)
    vals = torch.cat([vpad[:, :, (o + 1) * w : (o + 1) * w + nb * w].reshape(b, h, nb, w, -1) for o in offsets], 3)
    kvalid = torch.cat([mpad[:, (o + 1) * w : (o + 1) * w + nb * w].reshape(b, nb, w) for o in offsets], 2)
    qb = qp.reshape(b, h, nb, w, -1)
    scores = qb @ keys.transpose(-1, -2) * scale  # [B, H, nb, w, len(offsets) * w]
    i = torch.arange(w, device=q.device)[:, None]
    j = torch.cat([torch.arange(w, device=q.device) + o * w for o in offsets])[None, :]
    allowed = ((i - j).abs() < w) & ((j <= i) if causal else True)
    allowed = allowed[None, None, None] & kvalid[:, None, :, None, :]
    out, lse = _masked_part(scores, allowed, vals, dropout_p)
    return out.reshape(b, h, nb * w, -1)[:, :, :n], lse.reshape(b, h, nb * w, 1)[:, :, :n]


def _periodic(q, k, v, valid, stride: int, window: int, causal: bool, scale: float, dropout_p: float = 0.0):
    """Softmax piece over j = i (mod stride), |i - j| >= window: one attention per residue class."""
    b, h, n, _ = q.shape
    qp, kp, vp = (_pad_to(x, stride) for x in (q, k, v))
    validp = _pad_to(valid, stride, dim=1)
    m = qp.shape[2] // stride

    def by_residue(x):  # [B, H, m * stride, D] -> [B, H, stride, m, D]; position = idx * stride + residue
        return x.reshape(b, h, m, stride, -1).transpose(2, 3)

    scores = by_residue(qp) @ by_residue(kp).transpose(-1, -2) * scale  # [B, H, stride, m, m]
    idx = torch.arange(m, device=q.device)
    dist = (idx[:, None] - idx[None, :]) * stride
    allowed = (dist.abs() >= window) & ((dist >= 0) if causal else True)
    kvalid = validp.reshape(b, m, stride).transpose(1, 2)  # [B, stride, m]
    allowed = allowed[None, None, None] & kvalid[:, None, :, None, :]
    out, lse = _masked_part(scores, allowed, by_residue(vp), dropout_p)
    unres = lambda x: x.transpose(2, 3).reshape(b, h, m * stride, -1)[:, :, :n]
    return unres(out), unres(lse)


def _block_diagonal(q, k, v, valid, block: int, causal: bool, scale: float, dropout_p: float = 0.0):
    """Softmax piece over keys in the same block of `block` tokens as the query."""
    b, h, n, _ = q.shape
    qp, kp, vp = (_pad_to(x, block) for x in (q, k, v))
    validp = _pad_to(valid, block, dim=1)
    nb = qp.shape[2] // block
    shape = lambda x: x.reshape(b, h, nb, block, -1)
    scores = shape(qp) @ shape(kp).transpose(-1, -2) * scale  # [B, H, nb, block, block]
    i = torch.arange(block, device=q.device)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(block, block, dtype=torch.bool, device=q.device)
    allowed = allowed[None, None, None] & validp.reshape(b, nb, block)[:, None, :, None, :]
    out, lse = _masked_part(scores, allowed, shape(vp), dropout_p)
    return out.reshape(b, h, nb * block, -1)[:, :, :n], lse.reshape(b, h, nb * block, 1)[:, :, :n]


def _summary(q, k, v, valid, stride: int, summary: int, causal: bool, scale: float, dropout_p: float = 0.0):
    """Softmax piece over the last `summary` keys of every other block (j mod stride >= stride - summary)."""
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    cols = pos[pos % stride >= stride - summary]  # [S] summary key positions
    scores = q @ k[:, :, cols].transpose(-1, -2) * scale  # [B, H, N, S]
    allowed = (pos[:, None] // stride) != (cols[None, :] // stride)
    if causal:
        allowed = allowed & (cols[None, :] <= pos[:, None])
    allowed = allowed[None, None] & valid[:, cols][:, None, None, :]
    return _masked_part(scores, allowed, v[:, :, cols], dropout_p)


KVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def sparse_attention_with_state(
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
    initial_state: KVState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, KVState | None]:
    """Sparse softmax attention with state in and out: the family's one entry point, where Triton or PyTorch is
    chosen. Softmax attention's state is its K/V cache: `(keys [B, Hkv, P, D], values [B, Hkv, P, Dv], padding mask
    [B, P] or None)` of the P positions seen before `k`; the new keys follow them and the queries are the last Nq of
    all P + N positions.

    Args:
        q, k, v, causal, pattern, stride, local, summary, scaling, backend, dropout_p: as `sparse_attention`.
        padding_mask: `[B, N]` bool for the new keys (None: all real).
        initial_state: the keys, values and padding mask seen before, or None.
        output_final_state: also return the state after the new keys (all P + N of them).

    Returns:
        `(out [B, H, Nq, Dv]` in v's dtype, the final state or None`)`.
    """
    if initial_state is not None:
        pk, pv, pmask = initial_state
        if pmask is not None or padding_mask is not None:
            ones = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            pones = torch.ones(pk.shape[0], pk.shape[2], dtype=torch.bool, device=k.device)
            padding_mask = torch.cat([pones if pmask is None else pmask.to(torch.bool),
                                      ones if padding_mask is None else padding_mask.to(torch.bool)], dim=1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    out = _sparse_attention(
        q, k, v, causal=causal, pattern=pattern, stride=stride, local=local, summary=summary, scaling=scaling,
        padding_mask=padding_mask, backend=backend, dropout_p=dropout_p,
    )
    return out, ((k, v, padding_mask) if output_final_state else None)


def sparse_attention(
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
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention restricted to a Child et al. 2019 sparse pattern: the output of
    `sparse_attention_with_state` without a state.

    Args:
        q: `[B, H, Nq, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H. When Nq < N the queries
            are the last Nq positions (decoding with a K/V cache): the allowed keys are gathered per query.
        causal: also require j <= i.
        pattern: "strided" or "fixed". stride: the period / block size. local: band width for "strided"
            (default stride). summary: summary keys per block for "fixed" (1 <= summary <= stride).
        scaling: score scale, default 1 / sqrt(D).
        padding_mask: `[B, N]` bool, True for real tokens.
        backend: "auto" | "torch" | "triton".
        dropout_p: attention dropout on the normalized weights, as sdpa's `dropout_p` (pass 0 outside training).
            The Triton kernel has none: with `dropout_p > 0` the PyTorch form runs whatever the backend.

    Returns:
        `[B, H, Nq, Dv]` in v's dtype. When the pattern allows every key it equals dense softmax attention.
    """
    return sparse_attention_with_state(
        q, k, v, causal=causal, pattern=pattern, stride=stride, local=local, summary=summary, scaling=scaling,
        padding_mask=padding_mask, backend=backend, dropout_p=dropout_p,
    )[0]


def _sparse_attention(q, k, v, *, causal, pattern, stride, local, summary, scaling, padding_mask, backend, dropout_p):
    """The body of `sparse_attention_with_state` on all keys (the state already prepended)."""
    spec = SparsePattern(pattern, stride, local, summary)
    check_dropout_p(dropout_p)
    b, h, nq, d = q.shape
    n = k.shape[2]
    if v.shape[2] != n or nq > n:
        raise ValueError(
            f"sparse attention: k and v must have the same length and q at most that many positions, got q {nq}, "
            f"k {n} and v {v.shape[2]}"
        )
    if padding_mask is not None and tuple(padding_mask.shape) != (b, n):
        raise ValueError(
            f"sparse attention: padding_mask must have shape [batch, keys] = {[b, n]}, got {list(padding_mask.shape)}"
        )
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    valid = (
        torch.ones(b, n, dtype=torch.bool, device=q.device) if padding_mask is None else padding_mask.to(torch.bool)
    )
    if dropout_p == 0 and use_triton(backend, q, k, v) and nq == n:
        from ..kernels import sparse_attention_triton

        return sparse_attention_triton(
            q, repeat_kv(k, h), repeat_kv(v, h), causal=causal, pattern=spec.pattern, stride=spec.stride,
            local=spec.window, summary=spec.summary, scaling=scale, key_mask=padding_mask,
        )
    qf, kf, vf = q.float(), repeat_kv(k, h).float(), repeat_kv(v, h).float()
    if nq != n:
        return _sparse_rows(qf, kf, vf, valid, spec, causal, scale, dropout_p).to(v.dtype)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if _can_use_flash(qf, causal, padding_mask is None or bool(valid.all()), dropout_p, grad):
        fast = _strided_flash if spec.pattern == "strided" else _fixed_flash
        return fast(qf, kf, vf, spec, scale).to(v.dtype)
    if spec.pattern == "strided":
        a = _band(qf, kf, vf, valid, spec.window, causal, scale, dropout_p)
        p = _periodic(qf, kf, vf, valid, spec.stride, spec.window, causal, scale, dropout_p)
    else:
        a = _block_diagonal(qf, kf, vf, valid, spec.stride, causal, scale, dropout_p)
        p = _summary(qf, kf, vf, valid, spec.stride, spec.summary, causal, scale, dropout_p)
    return _merge(*a, *p).to(v.dtype)


def _flash_piece(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False):
    """One softmax piece through torch's CPU flash-attention kernel, which also returns the log-sum-exp the merge
    needs: q `[X, Y, L, D]`, k/v `[X, Y, S, D]`, mask `[L, S]` bool shared by all. Returns (out, lse `[X, Y, L, 1]`);
    rows without any allowed key come back as out 0 with lse 0, so callers set their lse to -inf."""
    additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~mask, float("-inf")
    )
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=additive, scale=scale
    )
    return out, lse.unsqueeze(-1)


def _can_use_flash(q: torch.Tensor, causal: bool, valid_all: bool, dropout_p: float, grad: bool) -> bool:
    """The flash-kernel form serves causal inference on CPU without padding or dropout (its masks are shared by
    every block; padding would need one per batch row, and the kernel's log-sum-exp has no gradient)."""
    return (
        causal and valid_all and dropout_p == 0 and not grad and q.device.type == "cpu" and q.shape[2] > 0
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _strided_flash(q, k, v, spec: SparsePattern, scale: float) -> torch.Tensor:
    """Causal strided pattern through the flash kernel: the band |i - j| < window as blocks of `window` queries
    against their own and the previous block (the first block alone, causal), and the periodic keys (j = i mod
    stride, i - j >= window) as one attention per residue class, merged by their log-sum-exps."""
    b, h, n, d = q.shape
    w, stride = spec.window, spec.stride
    qp, kp, vp = (_pad_to(x, w) for x in (q, k, v))  # padded keys come after every real query: causality hides them
    nb = qp.shape[2] // w
    blocks = lambda x: x.reshape(b * h, nb, w, x.shape[-1])  # noqa: E731
    qb, kb, vb = blocks(qp), blocks(kp), blocks(vp)
    band_out, band_lse = q.new_empty(b * h, nb, w, v.shape[-1]), q.new_empty(b * h, nb, w, 1)
    band_out[:, :1], band_lse[:, :1] = _flash_piece(qb[:, :1], kb[:, :1], vb[:, :1], scale, causal=True)
    if nb > 1:
        i = torch.arange(w, device=q.device)[:, None] + w
        j = torch.arange(2 * w, device=q.device)[None, :]
        pairs = lambda x: torch.cat([x[:, :-1], x[:, 1:]], dim=2)  # noqa: E731  [prev block | this block]
        band_out[:, 1:], band_lse[:, 1:] = _flash_piece(
            qb[:, 1:], pairs(kb), pairs(vb), scale, mask=(j <= i) & (i - j < w)
        )
    band_out = band_out.reshape(b, h, nb * w, -1)[:, :, :n]
    band_lse = band_lse.reshape(b, h, nb * w, 1)[:, :, :n]
    qp, kp, vp = (_pad_to(x, stride) for x in (q, k, v))
    m = qp.shape[2] // stride
    by_residue = lambda x: x.reshape(b * h, m, stride, x.shape[-1]).transpose(1, 2)  # noqa: E731
    idx = torch.arange(m, device=q.device)
    dist = (idx[:, None] - idx[None, :]) * stride
    allowed = (dist >= w) & (dist >= 0)
    out, lse = _flash_piece(by_residue(qp), by_residue(kp), by_residue(vp), scale, mask=allowed)
    lse[:, :, : -(-w // stride)] = float("-inf")  # rows with no periodic key (the kernel reports lse 0 for them)
    unres = lambda x: x.transpose(1, 2).reshape(b, h, m * stride, -1)[:, :, :n]  # noqa: E731
    return _merge(band_out, band_lse, unres(out), unres(lse))


def _fixed_flash(q, k, v, spec: SparsePattern, scale: float) -> torch.Tensor:
    """Causal fixed pattern through the flash kernel: the block diagonal (causal inside each block) and the
    summary keys of the earlier blocks, merged by their log-sum-exps."""
    b, h, n, d = q.shape
    stride, summary = spec.stride, spec.summary
    qp, kp, vp = (_pad_to(x, stride) for x in (q, k, v))
    nb = qp.shape[2] // stride
    blocks = lambda x: x.reshape(b * h, nb, stride, x.shape[-1])  # noqa: E731
    diag_out, diag_lse = _flash_piece(blocks(qp), blocks(kp), blocks(vp), scale, causal=True)
    diag_out = diag_out.reshape(b, h, nb * stride, -1)[:, :, :n]
    diag_lse = diag_lse.reshape(b, h, nb * stride, 1)[:, :, :n]
    if nb == 1:  # no earlier block (and the kernel must not see zero keys)
        return diag_out
    pos = torch.arange(n, device=q.device)
    cols = pos[pos % stride >= stride - summary]
    allowed = (pos[:, None] // stride) > (cols[None, :] // stride)  # earlier blocks only (causal)
    out, lse = _flash_piece(q, k[:, :, cols], v[:, :, cols], scale, mask=allowed)
    lse[:, :, :stride] = float("-inf")  # the first block has no earlier block
    return _merge(diag_out, diag_lse, out, lse)


def _sparse_rows(q, k, v, valid, spec: SparsePattern, causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Queries at the last Nq of N positions (few of them when decoding): dense rows of the pattern mask."""
    nq, n = q.shape[2], k.shape[2]
    rows = _pattern_rows(n - nq, n, spec, causal, q.device)  # [Nq, N]
    allowed = rows[None, None] & valid[:, None, None, :]
    out, _ = _masked_part(q @ k.transpose(-1, -2) * scale, allowed, v, dropout_p)
    return out


def _pattern_rows(first: int, n: int, spec: SparsePattern, causal: bool, device) -> torch.Tensor:
    return sparse_pattern_rows(
        first, n, causal=causal, pattern=spec.pattern, stride=spec.stride, local=spec.window, summary=spec.summary,
        device=device,
    )


__all__ = ["SPARSE_PATTERNS", "SparsePattern", "sparse_attention", "sparse_attention_with_state", "sparse_pattern_mask"]
