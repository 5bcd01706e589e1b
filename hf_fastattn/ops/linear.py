"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    out_i = phi(q_i) . S_i / phi(q_i) . z_i,   S_i = sum_{j <= i} phi(k_j) v_j^T,   z_i = sum_{j <= i} phi(k_j)

The family's entry point is `linear_attention_with_state(q, k, v, ..., initial_state, output_final_state) ->
(o, final_state)` (fla's `ops/linear_attn` signature); it picks the Triton kernels or PyTorch, once, and the form:
- the chunked causal form for training and prefill (`causal_linear_attention`): the sequence is cut into chunks of
  C tokens; inside a chunk the weights phi(q) phi(k)^T are formed explicitly (C x C), across chunks the state S is
  carried: O(N C F + N F Dv) for feature size F. Without autograd, or without a state in or out, it takes the CPU
  fast path of `linear_cpu.py` (one `bmm` over heads x chunks, segment by segment);
- the recurrent step (one causal token against a state: O(F Dv) whatever the position), for decoding;
- the bidirectional form (`bidirectional_linear_attention`): one state over all keys.
`linear_attention` (output only), `chunk_linear_attention` (inputs already feature-mapped) and `recurrent_linear_step`
(one token) are its narrower forms. All accumulate in fp32.

Layout: q `[B, H, N, D]`, k `[B, Hkv, N, D]`, v `[B, Hkv, N, Dv]`, Hkv dividing H. The recurrent state has the
K/V heads: S `[B, Hkv, F, Dv]`, z `[B, Hkv, F]` (query heads of one group share it, as in GQA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .common import group_heads as _group
from .common import repeat_kv, use_triton
from .dropout import key_dropout
from .feature_maps import get_feature_map
from .linear_cpu import (  # noqa: F401  (the CPU fast path; names re-exported for tests and callers)
    _EPS,
    _FAST_CHUNK,
    _FAST_SEGMENT,
    _bidirectional_inference,
    _CausalLinearFunction,
    _chunk_products,
    _elu_plus_one,
    _fast_causal,
    _flat_map,
    _needs_grad,
)

State = tuple[torch.Tensor, torch.Tensor]

# fp32 elements of intermediates per segment of the chunked form. Small segments keep a segment's tensors in the
# CPU caches between the ops that touch them (3x faster than one big segment at N=16K); under autograd, where
# every op is replayed backwards, somewhat larger segments are best (both measured with `bench attention`).
_SEGMENT_BUDGET = 1 << 21
_SEGMENT_BUDGET_GRAD = 1 << 23


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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


def linear_attention_with_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    feature_map: str | nn.Module | None = "elu",
    padding_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    intra_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    decode: bool | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Linear attention with recurrent state in and out: the family's one entry point, where Triton or PyTorch is
    chosen (`hf_fastattn.kernels.dispatch`) and then the form (chunked, recurrent step, bidirectional).

    Args:
        q: `[B, H, N, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H.
        causal: attend to j <= i (True) or to all j (False).
        feature_map: "elu" (elu + 1), "relu", an `nn.Module` mapping `[..., D]` to `[..., F]` (learned maps; a
            per-head map gets K/V repeated to the query heads, and its state then has H heads), or None: q and k are
            already feature-mapped (`chunk_linear_attention`).
        padding_mask: `[B, N]` bool, True for real tokens; padded keys contribute nothing (nor enter the state).
        initial_state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`, keys seen before position 0, or None.
        output_final_state: also return the state after the last token.
        chunk_size: C, tokens per chunk of the causal form; None picks 64 (256 for feature maps over 256 wide).
        backend: "auto" | "torch" | "triton".
        intra_weights: optional `(q_chunk, k_chunk) -> [..., C, C]` weights equal to phi(q) phi(k)^T but cheaper
            (fastmax's f(q.k) in D dimensions); used by the PyTorch causal form.
        dropout_p: attention dropout as keys dropped for every query (`hf_fastattn.ops.dropout.key_dropout`).
        decode: run the recurrent step (one causal token against `initial_state`). None: exactly when that is the
            input; False: the chunked form even then.

    Returns:
        `(out [B, H, N, Dv]` in v's dtype, the final state `(S, z)` or None`)`. The recurrent step always returns it.
    """
    fmap = _identity if feature_map is None else get_feature_map(feature_map)
    v = key_dropout(v, dropout_p)
    if getattr(fmap, "per_head", False) and k.shape[1] != q.shape[1]:
        # a per-head learned map has one set of weights per query head: give k those heads too
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    step = causal and q.shape[2] == 1 and initial_state is not None
    if decode and not step:
        raise ValueError(
            f"decode=True runs the recurrent step: one causal token with an initial_state, got {q.shape[2]} tokens, "
            f"causal={causal}, initial_state {'given' if initial_state is not None else 'None'}"
        )
    step = step if decode is None else decode
    triton = use_triton(backend, q, k, v)  # the family's one backend choice

    def key_features():
        kf = fmap(k)
        return kf if padding_mask is None else kf * padding_mask[:, None, :, None].to(kf.dtype)

    if step:
        return _recurrent_step(fmap(q), key_features(), v, initial_state, triton)
    if triton:
        from ..kernels import linear_attention_triton

        return _triton_grouped(
            linear_attention_triton, fmap(q), key_features(), v, causal, initial_state, output_final_state
        )
    if causal:
        return causal_linear_attention(
            q, k, v, feature_map=fmap, intra_weights=intra_weights, key_mask=padding_mask, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )
    if feature_map is not None and initial_state is None and not output_final_state:
        return bidirectional_linear_attention(q, k, v, feature_map=fmap, key_mask=padding_mask), None
    out, state = _bidirectional_with_state(fmap(q), key_features(), v, initial_state)
    return out, (state if output_final_state else None)


def _recurrent_step(qf, kf, v, state: State, triton: bool) -> tuple[torch.Tensor, State]:
    """One decoding step on features (see `recurrent_linear_step`); the Triton kernel wants equal head counts."""
    if triton and qf.shape[1] == kf.shape[1]:
        from ..kernels import recurrent_linear_step_triton

        return recurrent_linear_step_triton(qf, kf, v, state)
    return _torch_step(qf, kf, v, state, in_place=False)


def _torch_step(qf, kf, v, state: State, in_place: bool) -> tuple[torch.Tensor, State]:
    """The PyTorch step: one pass over the state for the update (S + k^T v by `baddbmm`, into a new tensor or, with
    `in_place`, into S itself) and one for the read, with the G query heads of a K/V group as the rows of one bmm
    (large feature maps make the step memory-bound). Returns `(out, (S, z))`."""
    qg, kg, vg = _group(qf.float(), kf.float(), v.float())
    b, hkv, g, _, f = qg.shape
    dv = vg.shape[-1]
    k_cols, v_rows = kg.reshape(b * hkv, f, 1), vg.reshape(b * hkv, 1, dv)
    if in_place:
        s = state[0].view(b * hkv, f, dv).baddbmm_(k_cols, v_rows)
        z = state[1].add_(kg.reshape(b, hkv, f))
    else:
        s = torch.baddbmm(state[0].float().reshape(b * hkv, f, dv), k_cols, v_rows)
        z = state[1].float() + kg.reshape(b, hkv, f)  # [B, Hkv, F]
    q_rows = qg.reshape(b * hkv, g, f)
    out = torch.bmm(q_rows, s).div_(torch.bmm(q_rows, z.reshape(b * hkv, f, 1)).clamp_min_(_EPS))
    return out.view(qf.shape[0], qf.shape[1], 1, dv).to(v.dtype), (s.view(b, hkv, f, dv), z)


def state_updatable_in_place(state: State) -> bool:
    """Whether `recurrent_linear_step_` can update `state` in place: contiguous float32 `(S, z)` (decoding on a
    `RecurrentCache` checks this before taking the in-place step)."""
    s, z = state
    return s.dtype == z.dtype == torch.float32 and s.is_contiguous() and z.is_contiguous()


def recurrent_linear_step_(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, state: State) -> torch.Tensor:
    """`recurrent_linear_step` with the state updated in place (decoding on a cache that owns it): no new state
    tensors and no copy back, which is most of a one-token step's cost at 64 x 64 states (PyTorch only; no autograd).

    Args:
        qf: `[B, H, 1, F]`. kf: `[B, Hkv, 1, F]`. v: `[B, Hkv, 1, Dv]`.
        state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`, contiguous float32 tensors (`state_updatable_in_place`),
            updated in place.

    Returns:
        `out [B, H, 1, Dv]` in v's dtype.
    """
    s, z = state
    if qf.shape[2] != 1:
        raise ValueError(f"recurrent_linear_step_ takes one token, got {qf.shape[2]}; use chunk_linear_attention")
    if not state_updatable_in_place(state):
        raise ValueError(
            "recurrent_linear_step_ updates contiguous float32 state tensors in place, got S and z of dtypes "
            f"{s.dtype} / {z.dtype}, contiguous {s.is_contiguous()} / {z.is_contiguous()}; use recurrent_linear_step"
        )
    expected = (*kf.shape[:2], kf.shape[-1], v.shape[-1])
    if tuple(s.shape) != expected or tuple(z.shape) != expected[:3]:
        raise ValueError(
            f"recurrent_linear_step_: the state has shapes S {tuple(s.shape)}, z {tuple(z.shape)}, but kf and v need "
            f"S {expected} and z {expected[:3]} (batch, K/V heads, features, value dim)"
        )
    if torch.is_grad_enabled() and any(x.requires_grad for x in (qf, kf, v, s, z)):
        raise ValueError("recurrent_linear_step_ updates the state in place and takes no autograd; use recurrent_linear_step")
    return _torch_step(qf, kf, v, state, in_place=True)[0]


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
    """Linear attention on already feature-mapped inputs, with recurrent state in and out (fla's "chunk" mode):
    `linear_attention_with_state` with `feature_map=None`, always the chunked (or bidirectional) form.

    Args:
        qf: `[B, H, N, F]` phi(q). kf: `[B, Hkv, N, F]` phi(k), zero rows for keys to ignore. v: `[B, Hkv, N, Dv]`.
        causal: prefix sums (True) or one state over all keys (False).
        initial_state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])` or None.

    Returns:
        `(out [B, H, N, Dv], final state or None)`.
    """
    return linear_attention_with_state(
        qf, kf, v, causal=causal, feature_map=None, initial_state=initial_state,
        output_final_state=output_final_state, chunk_size=chunk_size, backend=backend, decode=False,
    )


def recurrent_linear_step(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, state: State, *, backend: str = "auto"
) -> tuple[torch.Tensor, State]:
    """One decoding step: fold the new token into the state, then read it with the query. O(F Dv) per head.
    `linear_attention_with_state` with `feature_map=None` and `decode=True`.

    Args:
        qf: `[B, H, 1, F]`. kf: `[B, Hkv, 1, F]` (zeros for a padded token). v: `[B, Hkv, 1, Dv]`.
        state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`.

    Returns:
        `(out [B, H, 1, Dv], new state)`; the new state is a new tensor (the old one is not modified).
    """
    if qf.shape[2] != 1:
        raise ValueError(f"recurrent_linear_step takes one token, got {qf.shape[2]}; use chunk_linear_attention")
    return linear_attention_with_state(
        qf, kf, v, feature_map=None, initial_state=state, output_final_state=True, backend=backend, decode=True
    )


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
    """Linear attention with feature map phi applied to q and k as given (no scaling): the output of
    `linear_attention_with_state` without a state.

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
    return linear_attention_with_state(
        q, k, v, causal=causal, feature_map=feature_map, padding_mask=padding_mask, chunk_size=chunk_size,
        backend=backend, dropout_p=dropout_p,
    )[0]
