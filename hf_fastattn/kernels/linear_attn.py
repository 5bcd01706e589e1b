"""Triton kernels for linear attention on feature-mapped inputs: chunked causal / bidirectional, one-token step.

The normalizer rides along as an extra value column: with v' = [v, 1], the unnormalized output q (S0 + sum k v'^T)
holds the numerator in its first Dv columns and the denominator q.z in the last, and the state S' = [S, z].
So one kernel, `chunk_linear_fwd_kernel`, computes everything, and its backward is three more launches of the same
kernel (dq a causal pass, dk and dv reverse passes), as in fla's fused chunk kernels. The division by the
denominator is done in PyTorch (autograd handles it).

Kernel layout: one program per (value block, batch * head); it walks the chunks of `BT` tokens in order,
keeps the running state `[F, BV]` in the fp32 final-state buffer (so any feature dimension F works, in blocks of
`BF`), and computes each chunk as q S + tril(q k^T) v. Accumulation is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import check_dtypes, dot_precision, interpreting, lazy_jit

State = tuple[torch.Tensor, torch.Tensor]
_EPS = 1e-6


@lazy_jit
def chunk_linear_fwd_kernel(
    q_ptr,  # [BH, N, F]
    k_ptr,  # [BH, N, F]
    v_ptr,  # [BH, N, DV]
    o_ptr,  # [BH, N, DV] fp32
    s_ptr,  # [BH, F, DV] fp32: holds the initial state on entry, the final state on exit
    N,
    F,
    DV,
    CAUSAL: tl.constexpr,
    REVERSE: tl.constexpr,
    BT: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    q_ptr += i_bh * N * F
    k_ptr += i_bh * N * F
    v_ptr += i_bh * N * DV
    o_ptr += i_bh * N * DV
    s_ptr += i_bh * F * DV
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    ar_t = tl.arange(0, BT)
    ar_f = tl.arange(0, BF)
    n_chunks = tl.cdiv(N, BT)
    n_fblocks = tl.cdiv(F, BF)
    if CAUSAL:
        for it in range(0, n_chunks):
            if REVERSE:
                i_t = n_chunks - 1 - it
            else:
                i_t = it
            offs_t = i_t * BT + ar_t
            mask_t = offs_t < N
            v = tl.load(
                v_ptr + offs_t[:, None] * DV + offs_v[None, :],
                mask=mask_t[:, None] & mask_v[None, :],
                other=0.0,
            )
            v = v.to(tl.float32)
            scores = tl.zeros([BT, BT], dtype=tl.float32)
            acc = tl.zeros([BT, BV], dtype=tl.float32)
            for i_f in range(0, n_fblocks):
                offs_f = i_f * BF + ar_f
                mask_f = offs_f < F
                mask_tf = mask_t[:, None] & mask_f[None, :]
                q = tl.load(q_ptr + offs_t[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0).to(
                    tl.float32
                )
                k = tl.load(k_ptr + offs_t[:, None] * F + offs_f[None, :], mask=mask_tf, other=0.0).to(
                    tl.float32
                )
                s = tl.load(
                    s_ptr + offs_f[:, None] * DV + offs_v[None, :],
                    mask=mask_f[:, None] & mask_v[None, :],
                    other=0.0,
                )
                scores += tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                acc += tl.dot(q, s, input_precision=DOT_PREC)
            if REVERSE:
                keep = ar_t[:, None] <= ar_t[None, :]
            else:
                keep = ar_t[:, None] >= ar_t[None, :]
            scores = tl.where(keep, scores, 0.0)
            acc += tl.dot(scores, v, input_precision=DOT_PREC)
            tl.store(
                o_ptr + offs_t[:, None] * DV + offs_v[None, :], acc, mask=mask_t[:, None] & mask_v[None, :]
            )
            # every thread has read the state of this chunk before anyone updates it
            tl.debug_barrier()
            for i_f in range(0, n_fblocks):
                offs_f = i_f * BF + ar_f
                mask_f = offs_f < F
                mask_sv = mask_f[:, None] & mask_v[None, :]
                k = tl.load(
                    k_ptr + offs_t[:, None] * F + offs_f[None, :],
                    mask=mask_t[:, None] & mask_f[None, :],
                    other=0.0,
                )
                s = tl.load(s_ptr + offs_f[:, None] * DV + offs_v[None, :], mask=mask_sv, other=0.0)
                s += tl.dot(tl.trans(k.to(tl.float32)), v, input_precision=DOT_PREC)
                tl.store(s_ptr + offs_f[:, None] * DV + offs_v[None, :], s, mask=mask_sv)
            tl.debug_barrier()
    else:
        # pass 1: the state over all keys; pass 2: every query reads it
        for i_f in range(0, n_fblocks):
            offs_f = i_f * BF + ar_f
            mask_f = offs_f < F
            mask_sv = mask_f[:, None] & mask_v[None, :]
            s = tl.load(s_ptr + offs_f[:, None] * DV + offs_v[None, :], mask=mask_sv, other=0.0)
            for i_t in range(0, n_chunks):
                offs_t = i_t * BT + ar_t
                mask_t = offs_t < N
                k = tl.load(
                    k_ptr + offs_t[:, None] * F + offs_f[None, :],
                    mask=mask_t[:, None] & mask_f[None, :],
                    other=0.0,
                )
                v = tl.load(
                    v_ptr + offs_t[:, None] * DV + offs_v[None, :],
                    mask=mask_t[:, None] & mask_v[None, :],
                    other=0.0,
                )
                s += tl.dot(tl.trans(k.to(tl.float32)), v.to(tl.float32), input_precision=DOT_PREC)
            tl.store(s_ptr + offs_f[:, None] * DV + offs_v[None, :], s, mask=mask_sv)
        tl.debug_barrier()
        for i_t in range(0, n_chunks):
            offs_t = i_t * BT + ar_t
            mask_t = offs_t < N
            acc = tl.zeros([BT, BV], dtype=tl.float32)
            for i_f in range(0, n_fblocks):
                offs_f = i_f * BF + ar_f
                mask_f = offs_f < F
                q = tl.load(
                    q_ptr + offs_t[:, None] * F + offs_f[None, :],
                    mask=mask_t[:, None] & mask_f[None, :],
                    other=0.0,
                )
                s = tl.load(
                    s_ptr + offs_f[:, None] * DV + offs_v[None, :],
                    mask=mask_f[:, None] & mask_v[None, :],
                    other=0.0,
                )
                acc += tl.dot(q.to(tl.float32), s, input_precision=DOT_PREC)
            tl.store(
                o_ptr + offs_t[:, None] * DV + offs_v[None, :], acc, mask=mask_t[:, None] & mask_v[None, :]
            )


@lazy_jit
def recurrent_linear_step_kernel(
    q_ptr,  # [BH, F]
    k_ptr,  # [BH, F]
    v_ptr,  # [BH, DV]
    s_ptr,  # [BH, F, DV]
    z_ptr,  # [BH, F]
    o_ptr,  # [BH, DV] fp32
    s_out_ptr,  # [BH, F, DV] fp32
    z_out_ptr,  # [BH, F] fp32
    F,
    DV,
    EPS,
    BF: tl.constexpr,
    BV: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    v = tl.load(v_ptr + i_bh * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    den = tl.zeros([BF], dtype=tl.float32)
    for i_f in range(0, tl.cdiv(F, BF)):
        offs_f = i_f * BF + tl.arange(0, BF)
        mask_f = offs_f < F
        q = tl.load(q_ptr + i_bh * F + offs_f, mask=mask_f, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + i_bh * F + offs_f, mask=mask_f, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + i_bh * F + offs_f, mask=mask_f, other=0.0).to(tl.float32) + k
        mask_sv = mask_f[:, None] & mask_v[None, :]
        s_offs = i_bh * F * DV + offs_f[:, None] * DV + offs_v[None, :]
        s = tl.load(s_ptr + s_offs, mask=mask_sv, other=0.0).to(tl.float32) + k[:, None] * v[None, :]
        num += tl.sum(q[:, None] * s, axis=0)
        den += q * z
        tl.store(s_out_ptr + s_offs, s, mask=mask_sv)
        if i_v == 0:
            tl.store(z_out_ptr + i_bh * F + offs_f, z, mask=mask_f)
    out = num / tl.maximum(tl.sum(den, axis=0), EPS)
    tl.store(o_ptr + i_bh * DV + offs_v, out, mask=mask_v)


def _blocks(n: int, f: int, dv: int) -> tuple[int, int, int]:
    """Chunk, feature and value block sizes: at least 16 (tl.dot), at most 64; bigger blocks in the interpreter
    (fewer Python-level iterations)."""
    cap = 64
    bt = 64 if interpreting() else min(64, max(16, triton.next_power_of_2(n)))
    bf = min(cap, max(16, triton.next_power_of_2(f)))
    bv = min(cap, max(16, triton.next_power_of_2(dv)))
    return bt, bf, bv


def _launch_chunk(q, k, v, s0, causal: bool, reverse: bool):
    b, h, n, f = q.shape
    dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(b, h, n, dv, device=q.device, dtype=torch.float32)
    s = torch.zeros(b, h, f, dv, device=q.device, dtype=torch.float32) if s0 is None else s0.float().clone()
    s = s.contiguous()
    if b * h == 0 or dv == 0:
        return o.zero_(), s
    bt, bf, bv = _blocks(n, f, dv)
    grid = (triton.cdiv(dv, bv), b * h)
    chunk_linear_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        s,
        n,
        f,
        dv,
        CAUSAL=causal,
        REVERSE=reverse,
        BT=bt,
        BF=bf,
        BV=bv,
        DOT_PREC=dot_precision(q, k, v),
    )
    return o, s


# torch.library custom ops: opaque to torch.compile (fake kernels give shapes), differentiable through
# register_autograd, whose backward calls the same op again.


@torch.library.custom_op("hf_fastattn::chunk_linear", mutates_args=())
def chunk_linear_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None, causal: bool, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized linear attention o_i = q_i (S0 + sum_{allowed j} k_j v_j^T), fp32 `(o [B,H,N,DV], S [B,H,F,DV])`.

    Allowed j: j <= i (causal), j >= i (causal and reverse, S0 counting as keys after the end), or all j.
    """
    return _launch_chunk(q, k, v, s0, causal, reverse)


@chunk_linear_op.register_fake
def _(q, k, v, s0, causal, reverse):
    b, h, n, f = q.shape
    dv = v.shape[-1]
    return q.new_empty(b, h, n, dv, dtype=torch.float32), q.new_empty(b, h, f, dv, dtype=torch.float32)


def _chunk_linear_setup(ctx, inputs, output):
    q, k, v, s0, causal, reverse = inputs
    ctx.save_for_backward(q, k, v, s0)
    ctx.causal, ctx.reverse = causal, reverse
    ctx.has_s0 = s0 is not None


def _chunk_linear_backward(ctx, do, ds):
    q, k, v, s0 = ctx.saved_tensors
    causal, reverse = ctx.causal, ctx.reverse
    # do enters the scans below as a q, k or v, so its dtype picks their dot precision (`dot_precision`): 16-bit
    # inputs get do in bfloat16 (fp32's range: the normalizer's gradient, -do.num / den^2, can pass fp16's 65504), as
    # flash-attn and fla take a 16-bit do, and the scans run in tf32 on tensor cores like the forward; an fp32 do
    # would make every product exact fp32 ("ieee", no tensor cores), which on an H100 made the backward 30-120x
    # slower than the forward (stop 42). fp32 inputs keep an fp32 do and exact products.
    grad_dtype = torch.float32 if torch.float32 in (q.dtype, k.dtype, v.dtype) else torch.bfloat16
    do = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device, dtype=grad_dtype) if do is None else do.to(grad_dtype)
    # dq_i = do_i S_i^T: the same scan with keys v, values k and state S0^T
    s0_t = None if s0 is None else s0.float().transpose(-1, -2).contiguous()
    dq, _ = chunk_linear_op(do, v, k, s0_t, causal, reverse)
    # dS_j = dS_final + sum over the queries that see j of q_i do_i^T: a scan in the other direction
    ds_t = None if ds is None else ds.float().transpose(-1, -2).contiguous()
    dk, ds0_t = chunk_linear_op(v, do, q, ds_t, causal, not reverse)
    dv, _ = chunk_linear_op(k, q, do, None if ds is None else ds.float().contiguous(), causal, not reverse)
    ds0 = ds0_t.transpose(-1, -2) if ctx.has_s0 else None
    return (
        dq.to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        (None if ds0 is None else ds0.to(s0.dtype)),
        None,
        None,
    )


chunk_linear_op.register_autograd(_chunk_linear_backward, setup_context=_chunk_linear_setup)


@torch.library.custom_op("hf_fastattn::recurrent_linear_step", mutates_args=())
def recurrent_linear_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token: S' = S + k v^T, z' = z + k, out = q S' / max(q.z', eps). Returns fp32 `(out, S', z')`."""
    b, h, _, f = q.shape
    dv = v.shape[-1]
    o = torch.empty(b, h, 1, dv, device=q.device, dtype=torch.float32)
    s_new = torch.empty(b, h, f, dv, device=q.device, dtype=torch.float32)
    z_new = torch.empty(b, h, f, device=q.device, dtype=torch.float32)
    if b * h == 0 or dv == 0:
        return o.zero_(), s_new.copy_(s), z_new.copy_(z)
    bf = max(16, min(128, triton.next_power_of_2(f)))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    grid = (triton.cdiv(dv, bv), b * h)
    recurrent_linear_step_kernel[grid](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        s.contiguous(),
        z.contiguous(),
        o,
        s_new,
        z_new,
        f,
        dv,
        eps,
        BF=bf,
        BV=bv,
    )
    return o, s_new, z_new


@recurrent_linear_step_op.register_fake
def _(q, k, v, s, z, eps):
    b, h, _, f = q.shape
    dv = v.shape[-1]
    new = q.new_empty
    return (
        new(b, h, 1, dv, dtype=torch.float32),
        new(b, h, f, dv, dtype=torch.float32),
        new(b, h, f, dtype=torch.float32),
    )


def _check_linear_inputs(name, qf, kf, v, state=None):
    check_dtypes(name, qf, kf, v)
    if qf.dim() != 4 or kf.shape != qf.shape or v.dim() != 4 or v.shape[:3] != qf.shape[:3]:
        raise ValueError(
            f"{name}: expected qf, kf [B, H, N, F] of one shape and v [B, H, N, Dv] (same heads: repeat K/V "
            f"heads first), got {tuple(qf.shape)}, {tuple(kf.shape)}, {tuple(v.shape)}"
        )
    if not (qf.device == kf.device == v.device):
        raise ValueError(f"{name}: inputs on different devices")
    if state is not None:
        b, h, _, f = qf.shape
        s, z = state
        if tuple(s.shape) != (b, h, f, v.shape[-1]) or tuple(z.shape) != (b, h, f):
            raise ValueError(
                f"{name}: state must be (S [B, H, F, Dv], z [B, H, F]) = {(b, h, f, v.shape[-1])}, {(b, h, f)}; "
                f"got {tuple(s.shape)}, {tuple(z.shape)}"
            )


def linear_attention_triton(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Normalized linear attention on feature-mapped inputs with the Triton chunk kernel.

    Args:
        qf: `[B, H, N, F]` phi(q). kf: `[B, H, N, F]` phi(k) (zero rows for ignored keys). v: `[B, H, N, Dv]`.
        causal: prefix sums (j <= i) or all keys.
        initial_state: `(S [B, H, F, Dv], z [B, H, F])`, keys seen before position 0, or None.
        output_final_state: also return the final state.

    Returns:
        `(out [B, H, N, Dv] in v's dtype, (S, z) in fp32 or None)`; out_i = qf_i S_i / max(qf_i z_i, 1e-6).
        Differentiable in qf, kf, v and the initial state.
    """
    _check_linear_inputs("linear_attention_triton", qf, kf, v, initial_state)
    dv = v.shape[-1]
    # the normalizer as one more value column: S' = [S, z]
    v_aug = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1)
    s0 = None
    if initial_state is not None:
        s0 = torch.cat([initial_state[0].float(), initial_state[1].float().unsqueeze(-1)], dim=-1)
    o, s = chunk_linear_op(qf, kf, v_aug, s0, causal, False)
    out = o[..., :dv] / o[..., dv:].clamp_min(_EPS)
    state = (s[..., :dv], s[..., dv]) if output_final_state else None
    return out.to(v.dtype), state


def recurrent_linear_step_triton(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, state: State
) -> tuple[torch.Tensor, State]:
    """One decoding step, fused: fold the token into the state, then read it with the query.

    Args:
        qf, kf: `[B, H, 1, F]`. v: `[B, H, 1, Dv]`. state: `(S [B, H, F, Dv], z [B, H, F])`.

    Returns:
        `(out [B, H, 1, Dv] in v's dtype, (S', z') fp32)`; new tensors, the old state is not modified.
        Inference only: no autograd (use `linear_attention_triton` with `initial_state` to train through steps).
    """
    _check_linear_inputs("recurrent_linear_step_triton", qf, kf, v, state)
    if qf.shape[2] != 1:
        raise ValueError(f"recurrent_linear_step_triton takes one token, got N={qf.shape[2]}")
    o, s, z = recurrent_linear_step_op(qf, kf, v, state[0], state[1], _EPS)
    return o.to(v.dtype), (s, z)


__all__ = [
    "chunk_linear_op",
    "linear_attention_triton",
    "recurrent_linear_step_op",
    "recurrent_linear_step_triton",
]
