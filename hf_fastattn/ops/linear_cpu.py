"""The CPU fast path of linear attention (`linear.causal_linear_attention` and `linear.bidirectional_linear_attention`
take it whenever it applies): every op a 3-d `bmm` over (heads x chunks), segment by segment, nothing of size N
allocated but the output; under autograd a custom `torch.autograd.Function` whose backward is three more causal
products. Split from `linear.py` (one family, two files): this is the tuned arithmetic, `linear.py` the forms and the
family's entry points.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .common import group_heads, repeat_kv
from .feature_maps import EluFeatureMap

_EPS = 1e-6

# The CPU fast path (`_chunk_products`): tokens per chunk and per segment (a segment's temporaries are small enough
# to be reused from the allocator's free lists and to stay in cache). Measured at N=16K, B=1, H=8, D=64: 64 / 512
# ties 32 / 256 on one thread and is ~8% faster on two.
_FAST_CHUNK = 64
_FAST_SEGMENT = 512


def _chunk_products(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    chunk: int = _FAST_CHUNK,
    segment: int = _FAST_SEGMENT,
    reverse: bool = False,
    maps: tuple[Callable, Callable] | None = None,
    keep: torch.Tensor | None = None,
    ones: bool = False,
    normalize: bool = False,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out_i = sum_{j <= i} (a_i . b_j) c_j (j >= i when `reverse`) for `[BH, N, *]` tensors, without autograd.

    The chunked form with every op a 3-d `bmm` over (heads x chunks), segment by segment: the weights inside a
    chunk (C x C, masked), the state entering each chunk (a running sum carried across chunks and segments, added
    in place: `cumsum` over a middle dimension is 20x slower on CPU), and `baddbmm` for a . state + weights . c.
    Nothing of size N is allocated but the output, so no op page-faults fresh memory.

    maps: functions applied to each segment of a and b (feature maps: phi(q), phi(k) computed where they are used).
    keep: `[BH, N]` 0/1 multiplied into the rows of b (padded keys). ones: also the products with a column of
    ones after c (the denominators sum_j a_i . b_j), computed on their own: a 65-wide matmul is 20% slower than
    a 64-wide one. normalize: return the products divided by the denominators (with `ones`), else both side by
    side. state: `[BH, F, E (+ 1 with ones)]` sum of b_j [c_j | 1]^T before the first position (after the last when
    `reverse`). Returns `(out [BH, N, E or E + 1], the state after the last position)`.
    """
    bh, n, _ = a.shape
    e = c.shape[-1]
    out = a.new_empty(bh, n, e + 1 if ones and not normalize else e)
    mask = torch.ones(chunk, chunk, dtype=a.dtype, device=a.device)
    mask = mask.triu_() if reverse else mask.tril_()
    s_state = z_state = None
    if state is not None:
        s_state = state[..., :e].contiguous()
        z_state = state[..., e].contiguous() if ones else None
    starts = range(0, n, segment)
    for start in reversed(starts) if reverse else starts:
        end = min(n, start + segment)
        length = end - start
        sa, sb, sc = a[:, start:end], b[:, start:end], c[:, start:end]
        if maps is not None:
            sa, sb = maps[0](sa), maps[1](sb)
        if keep is not None:
            sb = sb * keep[:, start:end, None]
        pad = (-length) % chunk
        if pad:  # zero rows of b contribute nothing; the rows of a past the end are dropped
            sa, sb, sc = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (sa, sb, sc))
        m = (length + pad) // chunk
        qa, kb, vc = (x.reshape(bh * m, chunk, x.shape[-1]) for x in (sa, sb, sc))
        f = kb.shape[-1]
        w = torch.bmm(qa, kb.transpose(1, 2)).mul_(mask)
        o = torch.bmm(w, vc)
        kv = torch.bmm(kb.transpose(1, 2), vc).view(bh, m, f, e)
        if s_state is None:
            s_state = kv.new_zeros(bh, f, e)
        chunks = range(m - 1, -1, -1) if reverse else range(m)
        for i in chunks:
            after = s_state + kv[:, i]
            kv[:, i] = s_state  # kv now holds the state entering chunk i
            s_state = after
        o = o.baddbmm_(qa, kv.view(bh * m, f, e))
        if ones:
            ks = kb.view(bh, m, chunk, f).sum(2)
            if z_state is None:
                z_state = ks.new_zeros(bh, f)
            for i in chunks:
                after = z_state + ks[:, i]
                ks[:, i] = z_state
                z_state = after
            den = torch.baddbmm(w.sum(-1, keepdim=True), qa, ks.view(bh * m, f, 1))
            if normalize:  # divided straight into the output (one pass)
                den = den.clamp_min_(_EPS).view(bh, m * chunk, 1)[:, :length]
                torch.div(o.view(bh, m * chunk, e)[:, :length], den, out=out[:, start:end])
                continue
            o = torch.cat([o, den], dim=-1)
        out[:, start:end] = o.view(bh, m * chunk, -1)[:, :length]
    if s_state is None:  # n == 0
        s_state = a.new_zeros(bh, b.shape[-1], e)
    if ones:
        z_state = s_state.new_zeros(bh, b.shape[-1]) if z_state is None else z_state
        return out, torch.cat([s_state, z_state.unsqueeze(-1)], dim=-1)
    return out, s_state


class _CausalLinearFunction(torch.autograd.Function):
    """Normalized causal linear attention on feature-mapped `[BH, N, F]` qf, kf and `[BH, N, Dv]` v, with a
    backward of three more `_chunk_products` (the gradients of a causal product are causal products too):
    with w_ij = qf_i . kf_j, out = num / den and dN = [dout / den | -(dout . out) / den]:
    dqf_i = sum_{j <= i} (dN_i . [v_j | 1]) kf_j, dkf_j = sum_{i >= j} ([v_j | 1] . dN_i) qf_i,
    dv_j = sum_{i >= j} (kf_j . qf_i) dout_i / den_i."""

    @staticmethod
    def forward(ctx, qf, kf, v, chunk):
        num_den, _ = _chunk_products(qf, kf, v, chunk=chunk, ones=True)
        den = num_den[..., -1:].clamp_min(_EPS)
        out = num_den[..., :-1] / den
        ctx.save_for_backward(qf, kf, v, out, den)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        qf, kf, v, out, den = ctx.saved_tensors
        chunk = ctx.chunk
        g = grad / den
        dn = torch.cat([g, -(g * out).sum(-1, keepdim=True)], dim=-1)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        dq = _chunk_products(dn, v1, kf, chunk=chunk)[0] if ctx.needs_input_grad[0] else None
        dk = _chunk_products(v1, dn, qf, chunk=chunk, reverse=True)[0] if ctx.needs_input_grad[1] else None
        dv = _chunk_products(kf, qf, g, chunk=chunk, reverse=True)[0] if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None


def _needs_grad(feature_map, *tensors: torch.Tensor) -> bool:
    """Whether autograd must see the computation: grad mode on and an input or a feature map weight needing grad."""
    if not torch.is_grad_enabled():
        return False
    params = feature_map.parameters() if isinstance(feature_map, nn.Module) else ()
    return any(x.requires_grad for x in tensors) or any(p.requires_grad for p in params)


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 as exp(min(x, 0)) + max(x, 0): the same values, 1.7x faster than `F.elu` on CPU (measured)."""
    return x.clamp(max=0).exp_().add_(x.clamp(min=0))


def _flat_map(feature_map, b: int, h: int, inplace: bool = True):
    """`feature_map` on `[B * H, L, D]` segments as on `[B, H, L, D]` (per-head maps see their heads); `inplace`
    allows the in-place elu + 1 (not under autograd)."""
    if inplace and type(feature_map) is EluFeatureMap:
        return _elu_plus_one
    return lambda x: feature_map(x.reshape(b, h, x.shape[1], x.shape[2])).flatten(0, 1)


def _fast_causal(q, k, v, feature_map, key_mask, initial_state, output_final_state, chunk_size):
    """The CPU fast path of `causal_linear_attention` (see `_chunk_products`); K/V heads repeated over the groups."""
    b, h, n, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    chunk = chunk_size or _FAST_CHUNK
    segment = max(chunk, _FAST_SEGMENT // chunk * chunk)
    q, k, v = q.float(), repeat_kv(k.float(), h), repeat_kv(v.float(), h)
    keep = None if key_mask is None else key_mask.to(torch.float32).repeat_interleave(h, 0)
    if _needs_grad(feature_map, q, k, v):  # the feature maps under autograd, the products in `_CausalLinearFunction`
        fmap = _flat_map(feature_map, b, h, inplace=False)
        qf, kf = fmap(q.flatten(0, 1)), fmap(k.flatten(0, 1))
        if keep is not None:
            kf = kf * keep[..., None]
        out = _CausalLinearFunction.apply(qf, kf, v.flatten(0, 1), chunk)
        return out.reshape(b, h, n, dv), None
    fmap = _flat_map(feature_map, b, h)
    state = None
    if initial_state is not None:
        s0, z0 = (repeat_kv(x.float(), h) for x in (initial_state[0], initial_state[1].unsqueeze(-1)))
        state = torch.cat([s0, z0], dim=-1).flatten(0, 1)
    out, state = _chunk_products(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), chunk=chunk, segment=segment, maps=(fmap, fmap),
        keep=keep, ones=True, normalize=True, state=state,
    )
    out = out.reshape(b, h, n, dv)
    if not output_final_state:
        return out, None
    state = state.reshape(b, hkv, h // hkv, -1, dv + 1)[:, :, 0]  # the query heads of a group share the state
    return out, (state[..., :dv], state[..., dv])


def _bidirectional_inference(q, k, v, feature_map, key_mask) -> torch.Tensor:
    """`bidirectional_linear_attention` without autograd, segment by segment: the state in one pass over the keys,
    then the outputs in one over the queries, the feature maps of a segment computed where they are used."""
    b, h, n, _ = q.shape
    group_heads(q, k, v)
    hkv, dv = k.shape[1], v.shape[-1]
    fmap = _flat_map(feature_map, b, hkv)
    kflat, vflat = k.float().flatten(0, 1), v.float().flatten(0, 1)
    keep = None if key_mask is None else key_mask.to(torch.float32).repeat_interleave(hkv, 0)
    s = z = None
    for start in range(0, n, _FAST_SEGMENT):
        kf = fmap(kflat[:, start : start + _FAST_SEGMENT])
        if keep is not None:
            kf = kf * keep[:, start : start + _FAST_SEGMENT, None]
        ds, dz = torch.bmm(kf.transpose(1, 2), vflat[:, start : start + _FAST_SEGMENT]), kf.sum(1, keepdim=True)
        s, z = (ds, dz) if s is None else (s.add_(ds), z.add_(dz))
    if s is None:  # n == 0
        return v.new_zeros(b, h, 0, dv)
    g = h // hkv
    # the G query heads of a K/V group side by side in the rows: [B * Hkv, G * L, F] against the group's state
    qflat = q.float().reshape(b * hkv, g, n, q.shape[-1])
    qmap = _flat_map(feature_map, b, h)
    out = q.new_empty(b * hkv, g, n, dv, dtype=torch.float32)
    sz = torch.cat([s, z.transpose(1, 2)], dim=-1)  # [B * Hkv, F, Dv + 1]
    for start in range(0, n, _FAST_SEGMENT):
        seg = qflat[:, :, start : start + _FAST_SEGMENT]
        length = seg.shape[2]
        qf = qmap(seg.reshape(b * h, length, -1)).reshape(b * hkv, g * length, -1)
        o = torch.bmm(qf, sz).view(b * hkv, g, length, dv + 1)
        torch.div(o[..., :dv], o[..., dv:].clamp_min(_EPS), out=out[:, :, start : start + length])
    return out.reshape(b, h, n, dv).to(v.dtype)
