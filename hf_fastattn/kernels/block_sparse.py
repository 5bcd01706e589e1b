"""Block-sparse softmax attention for the Child et al. 2019 patterns (flash-style online softmax, Triton).

The sequence is cut into query blocks of `BM` and key blocks of `BN` tokens. A block table, computed exactly from
the pattern's arithmetic (no N x N mask), lists for every query block the key blocks holding at least one allowed
(query, key) pair; the kernel visits only those, and applies the token-level pattern, causality and the key mask
inside each block. Blocks without an allowed entry are skipped: the cost is the number of listed blocks, which for
Child et al.'s patterns with stride >= block size is O(N (N / stride + local)) tokens pairs.

Forward: one program per (query block, batch * head), running max / sum in fp32, stores out and the log-sum-exp.
Backward (as FlashAttention-2): delta = rowsum(dO * O) in PyTorch; one kernel per key block accumulates dK, dV
over the query blocks that list it (transposed table); one kernel per query block accumulates dQ.

The token rule is `ops.common.sparse_pattern_rows` in Triton, in both kernels (a shared `@triton.jit` helper would be
decorated at import, the mode `_jit.lazy_jit` avoids freezing). Over 450 lines: one kernel, its table, ops and autograd.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._jit import check_dtypes, dot_precision, interpreting, lazy_jit

PATTERNS = {"strided": 0, "fixed": 1}
MAX_HEAD_DIM = 256
# a finite "minus infinity": masked scores never win the running max, and exp(NEG - m) underflows to 0 (a
# constexpr: compiled Triton refuses plain module globals inside a kernel, the interpreter does not)
NEG = tl.constexpr(-1.0e30)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def block_table(
    n: int,
    bm: int,
    bn: int,
    *,
    causal: bool,
    pattern: str,
    stride: int,
    local: int,
    summary: int,
    device=None,
) -> torch.Tensor:
    """`[ceil(N/BM), ceil(N/BN)]` bool: whether query block I and key block J hold an allowed pair.

    Exact, from interval arithmetic: for the strided pattern the differences i - j over a block pair cover the
    integer range [I0 - J1, I1 - J0]; for the fixed pattern the stride-blocks of I and J overlap, or J holds a
    summary key (j mod stride >= stride - summary) not after the last query of I (when causal).
    """
    i0 = torch.arange(0, n, bm, device=device)[:, None]
    i1 = (i0 + bm - 1).clamp(max=n - 1)
    j0 = torch.arange(0, n, bn, device=device)[None, :]
    j1 = (j0 + bn - 1).clamp(max=n - 1)
    if pattern == "strided":
        lo, hi = i0 - j1, i1 - j0
        if causal:
            lo = lo.clamp(min=0)
        band = (lo < local) & (hi > -local)
        periodic = torch.div(hi, stride, rounding_mode="floor") * stride >= lo
        return (lo <= hi) & (band | periodic)
    if pattern == "fixed":
        same = (i0 // stride <= j1 // stride) & (j0 // stride <= i1 // stride)
        last = torch.minimum(j1, i1) if causal else j1.expand_as(i1 + j1)
        if causal:
            same = same & (j0 <= i1)
        r = j0 % stride
        first = torch.where(r >= stride - summary, j0, j0 - r + stride - summary)
        return same | (first <= last)
    raise ValueError(f"sparse_attention_triton: pattern must be one of {tuple(PATTERNS)}, got {pattern!r}")


@functools.lru_cache(maxsize=64)
def _tables(n, bm, bn, causal, pattern, stride, local, summary, device):
    """Lists of visited blocks: per query block its key blocks, per key block its query blocks (int32, padded)."""
    table = block_table(
        n, bm, bn, causal=causal, pattern=pattern, stride=stride, local=local, summary=summary, device=device
    )

    def lists(t):
        counts = t.sum(1).to(torch.int32)
        width = max(int(counts.max().item()) if t.numel() else 0, 1)
        # stable sort puts the listed blocks first, in increasing order
        order = torch.sort((~t).to(torch.int8), dim=1, stable=True).indices[:, :width]
        return counts.contiguous(), order.to(torch.int32).contiguous(), width

    return lists(table), lists(table.t())


@lazy_jit
def block_sparse_fwd_kernel(
    q_ptr,  # [BH, N, D]
    k_ptr,  # [BH, N, D]
    v_ptr,  # [BH, N, DV]
    km_ptr,  # [B, N] int8 (read when HAS_MASK)
    o_ptr,  # [BH, N, DV] fp32
    lse_ptr,  # [BH, N] fp32
    cnt_ptr,  # [NQB] int32
    idx_ptr,  # [NQB, WIDTH] int32
    WIDTH,
    H,
    N,
    D,
    DV,
    SCALE,
    STRIDE,
    LOCAL,
    SUMMARY,
    PATTERN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    q_ptr += i_bh * N * D
    k_ptr += i_bh * N * D
    v_ptr += i_bh * N * DV
    offs_m = i_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mask_m = offs_m < N
    q = tl.load(
        q_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0
    ).to(CT)
    m_i = tl.full([BM], NEG, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for t in range(0, tl.load(cnt_ptr + i_m)):
        i_n = tl.load(idx_ptr + i_m * WIDTH + t)
        offs_n = i_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        k = tl.load(
            k_ptr + offs_n[:, None] * D + offs_d[None, :],
            mask=mask_n[:, None] & (offs_d[None, :] < D),
            other=0.0,
        ).to(CT)
        v = tl.load(
            v_ptr + offs_n[:, None] * DV + offs_dv[None, :],
            mask=mask_n[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        ).to(CT)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * SCALE
        i = offs_m[:, None]
        j = offs_n[None, :]
        if PATTERN == 0:
            dist = tl.abs(i - j)
            allowed = (dist < LOCAL) | (dist % STRIDE == 0)
        else:
            allowed = (i // STRIDE == j // STRIDE) | (j % STRIDE >= STRIDE - SUMMARY)
        if CAUSAL:
            allowed = allowed & (j <= i)
        allowed = allowed & mask_n[None, :]
        if HAS_MASK:
            km = tl.load(km_ptr + (i_bh // H) * N + offs_n, mask=mask_n, other=0)
            allowed = allowed & (km[None, :] != 0)
        s = tl.where(allowed, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), 0.0)
    tl.store(
        o_ptr + i_bh * N * DV + offs_m[:, None] * DV + offs_dv[None, :],
        out,
        mask=mask_m[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(lse_ptr + i_bh * N + offs_m, lse, mask=mask_m)


@lazy_jit
def block_sparse_bwd_kernel(
    q_ptr,  # [BH, N, D]
    k_ptr,  # [BH, N, D]
    v_ptr,  # [BH, N, DV]
    km_ptr,  # [B, N] int8
    do_ptr,  # [BH, N, DV]
    lse_ptr,  # [BH, N] fp32
    delta_ptr,  # [BH, N] fp32
    dq_ptr,  # [BH, N, D] fp32 (written when not KV_PASS)
    dk_ptr,  # [BH, N, D] fp32 (written when KV_PASS)
    dv_ptr,  # [BH, N, DV] fp32 (written when KV_PASS)
    cnt_ptr,  # [NB] int32: per query block (dQ pass) or per key block (dK/dV pass)
    idx_ptr,  # [NB, WIDTH] int32
    WIDTH,
    H,
    N,
    D,
    DV,
    SCALE,
    STRIDE,
    LOCAL,
    SUMMARY,
    PATTERN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    KV_PASS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CT: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    q_ptr += i_bh * N * D
    k_ptr += i_bh * N * D
    v_ptr += i_bh * N * DV
    do_ptr += i_bh * N * DV
    lse_ptr += i_bh * N
    delta_ptr += i_bh * N
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mask_d = offs_d[None, :] < D
    mask_dv = offs_dv[None, :] < DV
    # the fixed side of this program: a key block (dK/dV pass) or a query block (dQ pass)
    if KV_PASS:
        offs_n = i_b * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        k = tl.load(
            k_ptr + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d, other=0.0
        ).to(CT)
        v = tl.load(
            v_ptr + offs_n[:, None] * DV + offs_dv[None, :], mask=mask_n[:, None] & mask_dv, other=0.0
        ).to(CT)
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BDV], dtype=tl.float32)
    else:
        offs_m = i_b * BM + tl.arange(0, BM)
        mask_m = offs_m < N
        q = tl.load(
            q_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d, other=0.0
        ).to(CT)
        do = tl.load(
            do_ptr + offs_m[:, None] * DV + offs_dv[None, :], mask=mask_m[:, None] & mask_dv, other=0.0
        ).to(CT)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BM, BD], dtype=tl.float32)
    for t in range(0, tl.load(cnt_ptr + i_b)):
        i_o = tl.load(idx_ptr + i_b * WIDTH + t)
        if KV_PASS:
            offs_m = i_o * BM + tl.arange(0, BM)
            mask_m = offs_m < N
            q = tl.load(
                q_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None] & mask_d, other=0.0
            ).to(CT)
            do = tl.load(
                do_ptr + offs_m[:, None] * DV + offs_dv[None, :], mask=mask_m[:, None] & mask_dv, other=0.0
            ).to(CT)
            lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
        else:
            offs_n = i_o * BN + tl.arange(0, BN)
            mask_n = offs_n < N
            k = tl.load(
                k_ptr + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d, other=0.0
            ).to(CT)
            v = tl.load(
                v_ptr + offs_n[:, None] * DV + offs_dv[None, :], mask=mask_n[:, None] & mask_dv, other=0.0
            ).to(CT)
        i = offs_m[:, None]
        j = offs_n[None, :]
        if PATTERN == 0:
            dist = tl.abs(i - j)
            allowed = (dist < LOCAL) | (dist % STRIDE == 0)
        else:
            allowed = (i // STRIDE == j // STRIDE) | (j % STRIDE >= STRIDE - SUMMARY)
        if CAUSAL:
            allowed = allowed & (j <= i)
        allowed = allowed & mask_n[None, :] & mask_m[:, None]
        if HAS_MASK:
            km = tl.load(km_ptr + (i_bh // H) * N + offs_n, mask=mask_n, other=0)
            allowed = allowed & (km[None, :] != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * SCALE
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if KV_PASS:
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PREC)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC) * SCALE
        else:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * SCALE
    if KV_PASS:
        tl.store(
            dk_ptr + i_bh * N * D + offs_n[:, None] * D + offs_d[None, :], dk, mask=mask_n[:, None] & mask_d
        )
        tl.store(
            dv_ptr + i_bh * N * DV + offs_n[:, None] * DV + offs_dv[None, :],
            dv,
            mask=mask_n[:, None] & mask_dv,
        )
    else:
        tl.store(
            dq_ptr + i_bh * N * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=mask_m[:, None] & mask_d
        )


def _block_sizes(block: int | None) -> tuple[int, int]:
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"sparse_attention_triton: block must be a power of two >= 16, got {block!r}")
        return block, block
    return (32, 32) if interpreting() else (64, 64)


def _common(q, k, v, key_mask, causal, pattern, stride, local, summary, block):
    b, h, n, d = q.shape
    dv = v.shape[-1]
    bm, bn = _block_sizes(block)
    (cnt, idx, width), (cnt_t, idx_t, width_t) = _tables(
        n, bm, bn, causal, pattern, stride, local, summary, q.device
    )
    km = q.new_zeros(1, dtype=torch.int8) if key_mask is None else key_mask.to(torch.int8).contiguous()
    meta = dict(
        H=h, N=n, D=d, DV=dv, STRIDE=stride, LOCAL=local, SUMMARY=summary, PATTERN=PATTERNS[pattern],
        CAUSAL=causal, HAS_MASK=key_mask is not None, BM=bm, BN=bn, BD=max(16, triton.next_power_of_2(d)),
        BDV=max(16, triton.next_power_of_2(dv)), DOT_PREC=dot_precision(q, k, v),
        # Triton 3.9's interpreter gets tl.dot on bf16 operands wrong (uint16 storage): fp32 operands there
        CT=tl.float32 if interpreting() else _TL_DTYPES[q.dtype],
    )  # fmt: skip
    return km, meta, (cnt, idx, width), (cnt_t, idx_t, width_t)


@torch.library.custom_op("hf_fastattn::block_sparse_fwd", mutates_args=())
def block_sparse_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    pattern: str,
    stride: int,
    local: int,
    summary: int,
    scale: float,
    block: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention: `(out [B, H, N, DV] fp32, lse [B, H, N] fp32)`."""
    b, h, n, _ = q.shape
    o = torch.zeros(b, h, n, v.shape[-1], device=q.device, dtype=torch.float32)
    lse = torch.zeros(b, h, n, device=q.device, dtype=torch.float32)
    if b * h * n == 0:
        return o, lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    km, meta, (cnt, idx, width), _ = _common(
        q, k, v, key_mask, causal, pattern, stride, local, summary, block
    )
    grid = (cnt.shape[0], b * h)
    block_sparse_fwd_kernel[grid](q, k, v, km, o, lse, cnt, idx, width, SCALE=scale, **meta)
    return o, lse


@block_sparse_fwd_op.register_fake
def _(q, k, v, key_mask, causal, pattern, stride, local, summary, scale, block):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[-1], dtype=torch.float32), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("hf_fastattn::block_sparse_bwd", mutates_args=())
def block_sparse_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    pattern: str,
    stride: int,
    local: int,
    summary: int,
    scale: float,
    block: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(dq, dk, dv)` in fp32 of `block_sparse_fwd_op` given dO and its saved out and lse."""
    b, h, n, d = q.shape
    dq = torch.zeros(b, h, n, d, device=q.device, dtype=torch.float32)
    dk = torch.zeros_like(dq)
    dv = torch.zeros(b, h, n, v.shape[-1], device=q.device, dtype=torch.float32)
    if b * h * n == 0:
        return dq, dk, dv
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do = do.to(v.dtype).contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, H, N]
    km, meta, (cnt, idx, width), (cnt_t, idx_t, width_t) = _common(
        q, k, v, key_mask, causal, pattern, stride, local, summary, block
    )
    lse = lse.contiguous()
    args = (q, k, v, km, do, lse, delta, dq, dk, dv)
    block_sparse_bwd_kernel[(cnt_t.shape[0], b * h)](
        *args, cnt_t, idx_t, width_t, SCALE=scale, KV_PASS=True, **meta
    )
    block_sparse_bwd_kernel[(cnt.shape[0], b * h)](*args, cnt, idx, width, SCALE=scale, KV_PASS=False, **meta)
    return dq, dk, dv


@block_sparse_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_mask, causal, pattern, stride, local, summary, scale, block):
    f32 = torch.float32
    return q.new_empty(q.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), v.new_empty(v.shape, dtype=f32)


def _sparse_setup(ctx, inputs, output):
    q, k, v, key_mask, *options = inputs
    ctx.save_for_backward(q, k, v, key_mask, *output)
    ctx.options = options


def _sparse_backward(ctx, do, dlse):
    q, k, v, key_mask, o, lse = ctx.saved_tensors
    dq, dk, dv = block_sparse_bwd_op(do, q, k, v, o, lse, key_mask, *ctx.options)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


block_sparse_fwd_op.register_autograd(_sparse_backward, setup_context=_sparse_setup)


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    pattern: str,
    stride: int,
    local: int,
    summary: int,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to a Child et al. pattern, visiting only blocks with an allowed pair.

    Args:
        q, k: `[B, H, N, D]`. v: `[B, H, N, Dv]` (same heads: repeat K/V heads first; self-attention, one N).
        causal: also require j <= i. pattern: "strided" or "fixed". stride, local, summary: as `sparse_pattern_mask`
            (`local` given explicitly). scaling: score scale.
        key_mask: `[B, N]` bool, True for real tokens.
        block: block size (power of two >= 16); default 64 on GPU, 32 in the interpreter.

    Returns:
        `[B, H, N, Dv]` in v's dtype; rows with no allowed key are 0. Differentiable in q, k, v.
    """
    check_dtypes("sparse_attention_triton", q, k, v)
    if pattern not in PATTERNS:
        raise ValueError(
            f"sparse_attention_triton: pattern must be one of {tuple(PATTERNS)}, got {pattern!r}"
        )
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "sparse_attention_triton: expected q, k [B, H, N, D] of one shape and v [B, H, N, Dv], "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"sparse_attention_triton: head dimension up to {MAX_HEAD_DIM} is supported, "
            f"got D={q.shape[-1]}, Dv={v.shape[-1]}"
        )
    for name, value, low in (("stride", stride, 1), ("local", local, 1), ("summary", summary, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"sparse_attention_triton: {name} must be a positive int, got {value!r}")
    if key_mask is not None and tuple(key_mask.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"sparse_attention_triton: key_mask must be [B, N] = {(q.shape[0], q.shape[2])}")
    out, _ = block_sparse_fwd_op(
        q, k, v, key_mask, causal, pattern, stride, local, summary, float(scaling), block
    )
    return out.to(v.dtype)


__all__ = ["block_sparse_fwd_op", "block_sparse_bwd_op", "block_table", "sparse_attention_triton"]
