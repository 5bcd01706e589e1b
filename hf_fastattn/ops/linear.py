"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    out_i = phi(q_i) . S_i / phi(q_i) . z_i,   S_i = sum_{j <= i} phi(k_j) v_j^T,   z_i = sum_{j <= i} phi(k_j)

Three forms of one computation (all accumulate in fp32):
- `chunk_linear_attention`: the parallel form for training and prefill. The sequence is cut into chunks of C
  tokens; inside a chunk the weights phi(q) phi(k)^T are formed explicitly (C x C), across chunks the state
  S is carried: O(N C F + N F Dv) for feature size F. All chunks of a segment are done in one batched matmul with
  a cumulative sum of per-chunk states (no Python loop over chunks), which is what makes it fast on CPU.
- `recurrent_linear_step`: one token against the state (S, z): O(F Dv) whatever the position. Used for decoding.
- the bidirectional form: one state over all keys.

Layout: q `[B, H, N, D]`, k `[B, Hkv, N, D]`, v `[B, Hkv, N, Dv]`, Hkv dividing H. The recurrent state has the
K/V heads: S `[B, Hkv, F, Dv]`, z `[B, Hkv, F]` (query heads of one group share it, as in GQA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .common import repeat_kv, use_triton
from .dropout import key_dropout
from .feature_maps import EluFeatureMap, get_feature_map

State = tuple[torch.Tensor, torch.Tensor]

# fp32 elements of intermediates per segment of the chunked form. Small segments keep a segment's tensors in the
# CPU caches between the ops that touch them (3x faster than one big segment at N=16K); under autograd, where
# every op is replayed backwards, somewhat larger segments are best (both measured with `bench attention`).
_SEGMENT_BUDGET = 1 << 21
_SEGMENT_BUDGET_GRAD = 1 << 23
_EPS = 1e-6


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Split query heads into K/V groups: q -> `[B, Hkv, G, N, *]`, k/v -> `[B, Hkv, 1, N, *]`."""
    b, h, n, _ = q.shape
    hkv = k.shape[1]
    if h % hkv != 0 or v.shape[1] != hkv:
        raise ValueError(
            f"q has {h} heads and k/v have {hkv}/{v.shape[1]}: the K/V heads must be equal and divide the query heads"
        )
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"q, k and v must have the same length, got {n}, {k.shape[2]} and {v.shape[2]}")
    return q.view(b, hkv, h // hkv, n, q.shape[-1]), k.unsqueeze(2), v.unsqueeze(2)


def _apply_map(feature_map, x: torch.Tensor) -> torch.Tensor:
    """Apply a feature map to grouped `[B, Hkv, G, L, D]` as to `[B, Hkv * G, L, D]` (per-head maps see heads)."""
    b, hkv, g, length, d = x.shape
    return feature_map(x.reshape(b, hkv * g, length, d)).reshape(b, hkv, g, length, -1)


def _segment_length(batch_heads: int, feature_dim: int, value_dim: int, chunk_size: int, grad: bool) -> int:
    per_token = batch_heads * (2 * feature_dim + 3 * feature_dim * value_dim / chunk_size)
    budget = _SEGMENT_BUDGET_GRAD if grad else _SEGMENT_BUDGET
    return max(chunk_size, int(budget / per_token) // chunk_size * chunk_size)


def _causal_segment(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v1: torch.Tensor,
    intra: torch.Tensor,
    state: torch.Tensor | None,
    chunk_size: int,
):
    """One segment (length a multiple of C) of the chunked causal form.

    qf `[B, Hkv, G, L, F]`, kf `[B, Hkv, 1, L, F]`, v1 `[B, Hkv, 1, L, Dv + 1]` (v with a column of ones, so
    one matmul gives numerator and denominator), intra `[B, Hkv, G, L/C, C, C]` the causal within-chunk weights,
    state `[B, Hkv, 1, F, Dv + 1]` (S and z side by side) or None for zeros.
    Returns `[B, Hkv, G, L, Dv + 1]` (numerator | denominator) and the state after the segment.
    """
    b, hkv, g, length, f = qf.shape
    nc = length // chunk_size
    q = qf.reshape(b, hkv, g, nc, chunk_size, f)
    k = kf.reshape(b, hkv, 1, nc, chunk_size, f)
    vc = v1.reshape(b, hkv, 1, nc, chunk_size, v1.shape[-1])
    # states entering each chunk: an exclusive prefix sum of the chunks' k^T [v | 1], written after a zero slot
    kv = k.transpose(-1, -2) @ vc  # [B, Hkv, 1, nc, F, Dv + 1]
    if kv.requires_grad:
        states = torch.cat([torch.zeros_like(kv[:, :, :, :1]), torch.cumsum(kv, dim=3)], dim=3)
    else:
        # without autograd, skip the concatenation copy: cumsum straight into the buffer
        states = kv.new_zeros(b, hkv, 1, nc + 1, f, v1.shape[-1])
        torch.cumsum(kv, dim=3, out=states[:, :, :, 1:])
    if state is not None:
        states = states + state.unsqueeze(3)
    out = q @ states[:, :, :, :-1] + intra @ vc  # [B, Hkv, G, nc, C, Dv + 1]
    return out.reshape(b, hkv, g, length, -1), states[:, :, :, -1]


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


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor] = _identity,
    intra_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    key_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked causal linear attention with the feature map applied segment by segment (bounded memory).

    Args:
        q, k, v: `[B, H, N, D]`, `[B, Hkv, N, D]`, `[B, Hkv, N, Dv]`, before the feature map.
        feature_map: maps `[..., D]` to non-negative features `[..., F]`.
        intra_weights: optional `(q_chunk, k_chunk) -> weights [..., C, C]` equal to phi(q) phi(k)^T but cheaper
            (fastmax computes f(q.k) in D dimensions rather than F). Defaults to the feature-space product.
        key_mask: `[B, N]` bool or 0/1, False/0 for keys that must contribute nothing (padding).
        initial_state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`, keys seen before position 0.
        output_final_state: also return the state after the last token.
        chunk_size: C, tokens per chunk; None picks 64 for small feature maps and 256 for large ones.

    Returns:
        `(out [B, H, N, Dv]` in v's dtype, `(S, z)` or None).
    """
    out_dtype = v.dtype
    b, h, n, _ = q.shape
    _group(q, k, v)  # checks the shapes
    grad = _needs_grad(feature_map, q, k, v, *(initial_state or ()))
    if intra_weights is None and (not grad or (initial_state is None and not output_final_state)):
        out, state = _fast_causal(q, k, v, feature_map, key_mask, initial_state, output_final_state, chunk_size)
        return out.to(out_dtype), state
    qg, kg, vg = _group(q.float(), k.float(), v.float())
    hkv, g = kg.shape[1], qg.shape[2]
    dv = v.shape[-1]
    mask = None if key_mask is None else key_mask.to(torch.float32).view(b, 1, 1, n, 1)
    f_dim = feature_map(q[:, :, :1].float()).shape[-1]
    if chunk_size is None:
        # large feature maps (fastmax order 2) pay per chunk state: fewer, longer chunks
        chunk_size = 64 if f_dim <= 256 else 256
    state = None
    if initial_state is not None:
        s0, z0 = initial_state
        state = torch.cat([s0.float(), z0.float().unsqueeze(-1)], dim=-1).unsqueeze(2)  # [B, Hkv, 1, F, Dv + 1]
    # a column of ones after v: the same matmuls then also give the denominators sum phi(q) . phi(k)
    v1 = torch.cat([vg, torch.ones_like(vg[..., :1])], dim=-1)
    # small maps: many chunks per segment, states of all chunks at once; large maps: one chunk per segment, a
    # sequential loop whose single state stays in cache instead of materializing one F x Dv state per chunk
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    seg = _segment_length(b * h, f_dim, dv + 1, chunk_size, grad) if f_dim <= 256 else chunk_size
    outs = []
    for start in range(0, n, seg):
        end = min(n, start + seg)
        length = end - start
        pad = (-length) % chunk_size
        qs, ks, vs = (torch.nn.functional.pad(x[..., start:end, :], (0, 0, 0, pad)) for x in (qg, kg, v1))
        qf, kf = _apply_map(feature_map, qs), _apply_map(feature_map, ks)
        keep = None
        if mask is not None:
            keep = torch.nn.functional.pad(mask[..., start:end, :], (0, 0, 0, pad))
        elif pad:
            # zero-padded keys at the tail would still have phi(0) > 0: mask them out
            keep = (torch.arange(length + pad, device=q.device) < length).float().view(1, 1, 1, -1, 1)
        if keep is not None:
            kf = kf * keep
        nc = qs.shape[3] // chunk_size
        if intra_weights is None:
            a = qf.reshape(b, hkv, g, nc, chunk_size, -1) @ kf.reshape(b, hkv, 1, nc, chunk_size, -1).transpose(-1, -2)
        else:
            a = intra_weights(qs.reshape(b, hkv, g, nc, chunk_size, -1), ks.reshape(b, hkv, 1, nc, chunk_size, -1))
            if keep is not None:
                a = a * keep.reshape(keep.shape[0], 1, 1, nc, 1, chunk_size)
        out, state = _causal_segment(qf, kf, vs, a.tril(), state, chunk_size)
        out = out[..., :length, :]
        outs.append(out[..., :dv] / out[..., dv:].clamp_min(_EPS))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)).reshape(b, h, n, dv).to(out_dtype)
    if not output_final_state:
        return out, None
    if state is None:  # n == 0
        state = torch.zeros(b, hkv, 1, f_dim, dv + 1, device=q.device)
    return out, (state[..., :dv].squeeze(2), state[..., dv].squeeze(2))


def bidirectional_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor] = _identity,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal linear attention: one state S = sum_j phi(k_j) v_j^T over all (unmasked) keys."""
    b, h, n, _ = q.shape
    if not _needs_grad(feature_map, q, k, v):
        return _bidirectional_inference(q, k, v, feature_map, key_mask)
    qg, kg, vg = _group(q.float(), k.float(), v.float())
    kf = _apply_map(feature_map, kg)
    if key_mask is not None:
        kf = kf * key_mask.to(torch.float32).view(b, 1, 1, n, 1)
    s = kf.transpose(-1, -2) @ vg  # [B, Hkv, 1, F, Dv]
    z = kf.sum(-2, keepdim=True)  # [B, Hkv, 1, 1, F]
    qf = _apply_map(feature_map, qg)
    out = (qf @ s) / (qf * z).sum(-1, keepdim=True).clamp_min(_EPS)
    return out.reshape(b, h, n, -1).to(v.dtype)


def _bidirectional_inference(q, k, v, feature_map, key_mask) -> torch.Tensor:
    """`bidirectional_linear_attention` without autograd, segment by segment: the state in one pass over the keys,
    then the outputs in one over the queries, the feature maps of a segment computed where they are used."""
    b, h, n, _ = q.shape
    _group(q, k, v)
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


def chunk_linear_attention(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Linear attention on already feature-mapped inputs, with recurrent state in and out (fla's "chunk" mode).

    Args:
        qf: `[B, H, N, F]` phi(q). kf: `[B, Hkv, N, F]` phi(k), zero rows for keys to ignore. v: `[B, Hkv, N, Dv]`.
        causal: prefix sums (True) or one state over all keys (False).
        initial_state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])` or None.

    Returns:
        `(out [B, H, N, Dv], final state or None)`.
    """
    if use_triton(backend, qf, kf, v):
        from ..kernels import linear_attention_triton

        return _triton_grouped(linear_attention_triton, qf, kf, v, causal, initial_state, output_final_state)
    if causal:
        return causal_linear_attention(
            qf, kf, v, initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size
        )
    out, state = _bidirectional_with_state(qf, kf, v, initial_state)
    return out, (state if output_final_state else None)


def _bidirectional_with_state(qf, kf, v, initial_state):
    qg, kg, vg = _group(qf.float(), kf.float(), v.float())
    s = kg.transpose(-1, -2) @ vg
    z = kg.sum(-2)
    if initial_state is not None:
        s = s + initial_state[0].float().unsqueeze(2)
        z = z + initial_state[1].float().unsqueeze(2)
    out = (qg @ s) / (qg @ z.unsqueeze(-1)).clamp_min(_EPS)
    return out.reshape(qf.shape[0], qf.shape[1], qf.shape[2], -1).to(v.dtype), (s.squeeze(2), z.squeeze(2))


def _triton_grouped(kernel, qf, kf, v, causal, initial_state, output_final_state):
    """Call a Triton kernel that wants equal head counts: repeat K/V (and the state) over the query groups."""
    h, hkv = qf.shape[1], kf.shape[1]
    rep = h // hkv
    if rep > 1:
        kf, v = kf.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if initial_state is not None:
            initial_state = tuple(x.repeat_interleave(rep, 1) for x in initial_state)
    out, state = kernel(qf, kf, v, causal=causal, initial_state=initial_state, output_final_state=output_final_state)
    if state is not None and rep > 1:
        state = tuple(x[:, ::rep] for x in state)
    return out, state


def recurrent_linear_step(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, state: State, *, backend: str = "auto"
) -> tuple[torch.Tensor, State]:
    """One decoding step: fold the new token into the state, then read it with the query. O(F Dv) per head.

    Args:
        qf: `[B, H, 1, F]`. kf: `[B, Hkv, 1, F]` (zeros for a padded token). v: `[B, Hkv, 1, Dv]`.
        state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`.

    Returns:
        `(out [B, H, 1, Dv], new state)`; the new state is a new tensor (the old one is not modified).
    """
    if qf.shape[2] != 1:
        raise ValueError(f"recurrent_linear_step takes one token, got {qf.shape[2]}; use chunk_linear_attention")
    if use_triton(backend, qf, kf, v):
        from ..kernels import recurrent_linear_step_triton

        h, hkv = qf.shape[1], kf.shape[1]
        if h == hkv:
            return recurrent_linear_step_triton(qf, kf, v, state)
    qg, kg, vg = _group(qf.float(), kf.float(), v.float())
    b, hkv, g, _, f = qg.shape
    dv = vg.shape[-1]
    # one pass over the state for the update (baddbmm: S + k^T v into a new tensor) and one for the read, with the
    # G query heads of a K/V group as the rows of one bmm (large feature maps make the step memory-bound)
    s = torch.baddbmm(state[0].float().reshape(b * hkv, f, dv), kg.reshape(b * hkv, f, 1), vg.reshape(b * hkv, 1, dv))
    z = state[1].float() + kg.reshape(b, hkv, f)  # [B, Hkv, F]
    q_rows = qg.reshape(b * hkv, g, f)
    out = torch.bmm(q_rows, s) / torch.bmm(q_rows, z.reshape(b * hkv, f, 1)).clamp_min(_EPS)
    s = s.view(b, hkv, f, dv)
    return out.reshape(qf.shape[0], qf.shape[1], 1, -1).to(v.dtype), (s, z)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    feature_map: str | nn.Module = "elu",
    padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Linear attention with feature map phi applied to q and k as given (no scaling).

    Args:
        q: `[B, H, N, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H.
        causal: attend to j <= i (True) or to all j (False).
        feature_map: "elu" (elu + 1), "relu", or an `nn.Module` mapping `[..., D]` to `[..., F]` (learned maps).
        padding_mask: `[B, N]` bool, True for real tokens; padded keys contribute nothing.
        backend: "auto" | "torch" | "triton" (see `hf_fastattn.kernels.dispatch`).
        dropout_p: attention dropout, as keys dropped for every query (`hf_fastattn.ops.dropout.key_dropout`:
            sdpa's per-weight form is not factorizable); pass 0 outside training.

    Returns:
        `[B, H, N, Dv]` in v's dtype.
    """
    fmap = get_feature_map(feature_map)
    v = key_dropout(v, dropout_p)
    if getattr(fmap, "per_head", False) and k.shape[1] != q.shape[1]:
        # a per-head learned map has one set of weights per query head: give k those heads too
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if use_triton(backend, q, k, v):
        qf, kf = fmap(q), fmap(k)
        if padding_mask is not None:
            kf = kf * padding_mask[:, None, :, None].to(kf.dtype)
        return chunk_linear_attention(qf, kf, v, causal=causal, backend="triton")[0]
    if causal:
        return causal_linear_attention(q, k, v, feature_map=fmap, key_mask=padding_mask, chunk_size=chunk_size)[0]
    return bidirectional_linear_attention(q, k, v, feature_map=fmap, key_mask=padding_mask)
