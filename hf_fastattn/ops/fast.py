"""FAST fastmax attention (Gerami et al. 2024): softmax's exp replaced by its Taylor truncation, in O(N).

    q_hat, k_hat = per-token mean-centred, L2-normalized q and k          (over D)
    s_ij = q_hat_i . k_hat_j / T
    out_i = sum_j f(s_ij) v_j / sum_j f(s_ij),   f(s) = 1 + s (+ s^2 / 2 for order 2)

Because f is a polynomial, f(q_hat . k_hat) = phi(q_hat) . phi(k_hat) with the features
[1, x, vec(x x^T) / sqrt(2)] (`FastmaxFeatureMap`, symmetric part only), so fastmax is linear attention with a
fixed feature map and runs through the same chunked / recurrent forms. Inside a chunk the weights are computed
directly as f(q_hat . k_hat) in D dimensions, which is cheaper than the feature-space product.

Normalization is per token, not by the largest norm in the sequence as in the paper: a causal model cannot let a
later token rescale earlier outputs.

On CUDA (or `backend="triton"`) `fast_attention_triton` builds the features in PyTorch and runs the Triton
linear-attention kernel (it lived in `hf_fastattn.kernels.fastmax`, which re-exports it for one release).
"""

from __future__ import annotations

import math

import torch

from ..kernels import fast2_causal
from . import memory
from .common import fast_normalize, fastmax_weight, repeat_kv, use_triton
from .dropout import key_dropout
from .feature_maps import FastmaxFeatureMap
from .linear import (
    State,
    _group,
    bidirectional_linear_attention,
    causal_linear_attention,
    linear_attention_with_state,
    recurrent_linear_step_,
    state_updatable_in_place,
)


def validate_fast_options(order: int, temperature: float) -> None:
    if order not in (1, 2):
        raise ValueError(f"fast attention: order must be 1 or 2, got {order!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"fast attention: temperature must be a positive number, got {temperature!r}")
    if order == 1 and temperature < 1:
        # f(s) = 1 + s must stay >= 0 for |s| <= 1 / T, or weights turn negative and denominators can vanish
        raise ValueError(f"fast attention: order 1 needs temperature >= 1 (weights 1 + s >= 0), got {temperature!r}")


def fast_feature_map(order: int = 2, temperature: float = 1.0) -> torch.nn.Module:
    """phi such that phi(q_hat) . phi(k_hat) = f(q_hat . k_hat / T); apply to normalized q and k."""
    validate_fast_options(order, temperature)
    return FastmaxFeatureMap(order, temperature)


# tokens per chunk of the order-2 inference form (measured at N=16K without per-chunk allocations: 128 beats 64 by
# 3% on 1 thread and 14% on 2, ties 256)
_ORDER2_CHUNK = 128


def _order2_features_t(qs: torch.Tensor, ks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Transposed order-2 features of a chunk's queries and keys side by side: `[BH, F, Lq + Lk]`, F = 1 + D +
    D(D+1)/2, rows [1, x, x_a^2 for every a, x_a x[a+1:] for every a]. Row-major in the feature index, each block
    is one contiguous write over all tokens (the `[..., F]` layout writes D-wide strided pieces, 4x slower). All
    the coefficients of f(s) = 1 + s + s^2/2 go on the query side (pass q_hat / T): the diagonal rows (one block,
    halved by one slice op) are halved there, the off-diagonal rows count twice in s^2 and so take coefficient 1,
    and the keys' features stay plain. `out`: a buffer of that shape to write them into (a fresh one per chunk
    cost more in page faults than the products themselves: measured 3x slower at N=16K)."""
    bh, lq, d = qs.shape
    length = lq + ks.shape[1]
    if out is None:
        out = qs.new_empty(bh, 1 + d + d * (d + 1) // 2, length)
    out[:, 0] = 1
    x = out[:, 1 : d + 1]  # the linear rows double as x: [BH, D, L], each row contiguous
    x[:, :, :lq] = qs.transpose(1, 2)
    x[:, :, lq:] = ks.transpose(1, 2)
    torch.mul(x, x, out=out[:, d + 1 : 2 * d + 1])
    out[:, d + 1 : 2 * d + 1, :lq] *= 0.5
    offset = 2 * d + 1
    for a in range(d - 1):
        torch.mul(x[:, a : a + 1], x[:, a + 1 :], out=out[:, offset : offset + d - 1 - a])
        offset += d - 1 - a
    return out


def _causal_order2_inference(q, k, v, temperature: float, key_mask, chunk: int) -> torch.Tensor:
    """Causal fastmax of order 2 without autograd, chunk by chunk over all heads at once (`[B * H, C, *]` bmm):
    inside a chunk the weights f(q_hat . k_hat / T) in D dimensions, before it the state S = sum phi(k) v^T,
    z = sum phi(k) of F = 1 + D + D(D+1)/2 features, read with phi(q) and updated in place (`baddbmm_`). q and k
    are normalized (`fast_normalize`) a chunk at a time, and the features of a chunk (`_order2_features_t`) never
    exist for the whole sequence: nothing N-sized is made but the output. Where the C++ kernel of
    `kernels/csrc/fast2_causal.cpp` is available (AVX-512), the same algorithm runs there, one (batch, K/V head) per
    thread (at N=16K on an AMD EPYC: as fast as this loop on one thread, 1.2x faster on two)."""
    _group(q, k, v)  # checks the shapes
    b, h, n, d = q.shape
    if fast2_causal.supports(q, k, v):
        out = memory.empty(b, h, n, v.shape[-1], like=q, dtype=torch.float32)
        fast2_causal.fast2_causal(q, k, v, temperature=temperature, key_mask=key_mask, chunk=chunk, out=out)
        return out.to(v.dtype)
    hkv, dv = k.shape[1], v.shape[-1]
    qf, kf, vf = q.float().flatten(0, 1), k.float().flatten(0, 1), v.float().flatten(0, 1)
    keep = None if key_mask is None else key_mask.to(torch.float32).repeat_interleave(h, 0)
    f = 1 + d + d * (d + 1) // 2
    s_state = qf.new_zeros(b * h, f, dv)
    # the denominators' state in D dimensions (reading sum_j phi(k_j) with phi(q) is a slow matrix-vector product):
    # sum_j f(q' . k_j) = count + q' . sum_j k_j + q'^T (sum_j k_j k_j^T) q' / 2
    count, k_sum, k_outer = qf.new_zeros(b * h, 1, 1), qf.new_zeros(b * h, d, 1), qf.new_zeros(b * h, d, d)
    out = memory.empty(b * h, n, dv, like=qf)
    tril = torch.ones(chunk, chunk, device=qf.device).tril_()
    features = memory.empty(b * h, f, 2 * min(chunk, n), like=qf)  # every whole chunk's features, reused

    def heads(x: torch.Tensor) -> torch.Tensor:  # K/V heads of a chunk repeated over their query groups
        return x if hkv == h else repeat_kv(x.view(b, hkv, *x.shape[1:]), h).flatten(0, 1)

    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        length = end - start
        qc = fast_normalize(qf[:, start:end]).div_(temperature)
        kc, vc = heads(fast_normalize(kf[:, start:end])), heads(vf[:, start:end])
        w = torch.bmm(qc, kc.transpose(1, 2))
        w = w.addcmul_(w, w, value=0.5).add_(1).mul_(tril[:length, :length])  # f(s) = 1 + s + s^2 / 2, causal
        if keep is not None:
            w = w.mul_(keep[:, None, start:end])
        num, den = torch.bmm(w, vc), w.sum(-1, keepdim=True)
        feats = _order2_features_t(qc, kc, out=features if 2 * length == features.shape[-1] else None)
        fq, fk = feats[:, :, :length].transpose(1, 2), feats[:, :, length:]
        num.baddbmm_(fq, s_state)
        den.add_(count).baddbmm_(qc, k_sum).add_((torch.bmm(qc, k_outer).mul_(qc)).sum(-1, keepdim=True), alpha=0.5)
        kk = kc
        if keep is not None:
            fk = fk * keep[:, None, start:end]
            kk = kc * keep[:, start:end, None]
            count += keep[:, start:end].sum(-1).view(-1, 1, 1)
        else:
            count += length
        s_state.baddbmm_(fk, vc)
        k_sum += kk.sum(1).unsqueeze(-1)
        k_outer.baddbmm_(kk.transpose(1, 2), kc)
        torch.div(num, den.clamp_min_(1e-6), out=out[:, start:end])
    return out.reshape(b, h, n, dv).to(v.dtype)


def _kernel_feature_scale(rows: torch.Tensor, cols: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[F]`: `FastmaxFeatureMap`'s order-2 features of k_hat are these times the C++ kernel's keys' features
    ([1, k, k_a k_b for a <= b] against [1, k / sqrt(T), k_a k_b / T, with the diagonal / sqrt(2)]), so the two
    states differ by this row scale. rows, cols: `torch.triu_indices(D, D)`, the pairs (a, b) in row order."""
    d = int(rows.max()) + 1
    quad = torch.where(rows == cols, 1 / (math.sqrt(2) * temperature), 1 / temperature).double()
    return torch.cat([torch.ones(1).double(), torch.full((d,), 1 / math.sqrt(temperature)).double(), quad]).float()


def _order2_kernel_with_state(q, k, v, temperature, padding_mask, initial_state, output_final_state, chunk):
    """Causal order 2 without autograd with a state in and out, on the C++ kernel (`kernels/fast2_causal`): the
    family's state `(S [B, Hkv, F, Dv], z [B, Hkv, F])` over `FastmaxFeatureMap`'s features converted to the kernel's
    (S over its own features and the moments count, sum k_hat, sum k_hat k_hat^T, which z holds: its first entry,
    its linear entries and its upper triangle) and back."""
    _group(q, k, v)  # checks the shapes
    b, _, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    f = 1 + d + d * (d + 1) // 2
    if initial_state is not None and (
        tuple(initial_state[0].shape) != (b, hkv, f, dv) or tuple(initial_state[1].shape) != (b, hkv, f)
    ):
        raise ValueError(
            f"fast attention: initial_state must be (S {[b, hkv, f, dv]}, z {[b, hkv, f]}) for these inputs, got "
            f"{[list(x.shape) for x in initial_state]}"
        )
    rows, cols = torch.triu_indices(d, d)
    scale = _kernel_feature_scale(rows, cols, temperature)
    state = fast2_causal.new_state(b, hkv, d, dv)
    if initial_state is not None:
        s0, z0 = (x.float() for x in initial_state)
        state[0].copy_(s0 / scale[:, None])
        state[1].copy_(z0[..., 1 : d + 1] * math.sqrt(temperature))
        upper = z0[..., d + 1 :] / scale[d + 1 :]
        state[2][..., rows, cols] = upper
        state[2][..., cols, rows] = upper
        state[3].copy_(z0[..., 0])
    out = memory.empty(b, q.shape[1], n, dv, like=q, dtype=torch.float32)
    fast2_causal.fast2_causal(
        q, k, v, temperature=temperature, key_mask=padding_mask, chunk=chunk, out=out, state=state
    )
    final = None
    if output_final_state:
        z = torch.cat(
            [state[3][..., None], state[1] / math.sqrt(temperature), state[2][..., rows, cols] * scale[d + 1 :]], -1
        )
        final = (state[0].mul_(scale[:, None]), z)
    return out.to(v.dtype), final


class _NormalizedFeatureMap(torch.nn.Module):
    """fastmax's features of the normalized input, `fmap(fast_normalize(x))`: the linear forms apply feature maps a
    segment at a time, so the normalization never makes N-sized temporaries (fresh 32 MiB tensors page-fault)."""

    def __init__(self, fmap: FastmaxFeatureMap):
        super().__init__()
        self.fmap = fmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmap(fast_normalize(x.float()))


def fast_attention_with_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    order: int = 2,
    temperature: float = 1.0,
    padding_mask: torch.Tensor | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    decode: bool | None = None,
) -> tuple[torch.Tensor, State | None]:
    """FAST fastmax attention in O(N) with recurrent state in and out: the family's one entry point, where Triton or
    PyTorch is chosen. The state is linear attention's (S, z) over fastmax's F features (`FastmaxFeatureMap`: F = 1 + D
    for order 1, 1 + D + D(D+1)/2 for order 2) of the normalized keys.

    Args:
        q: `[B, H, N, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H.
        causal: attend to j <= i (True) or to all j (False).
        order: 1 or 2, the Taylor order of f.
        temperature: T > 0 dividing q_hat . k_hat (order 1 needs T >= 1).
        padding_mask: `[B, N]` bool, True for real tokens; padded keys get weight 0.
        initial_state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`, keys seen before position 0, or None.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the causal form (None: the form's own default).
        backend: "auto" | "torch" | "triton".
        dropout_p: attention dropout, as keys dropped for every query (`hf_fastattn.ops.dropout.key_dropout`);
            pass 0 outside training.
        decode: as in `linear_attention_with_state` (one causal token with a state: the recurrent step).

    Returns:
        `(out [B, H, N, Dv]` in v's dtype, the final state or None`)`.
    """
    validate_fast_options(order, temperature)
    v = key_dropout(v, dropout_p)
    triton = use_triton(backend, q, k, v)  # the family's one backend choice
    inference = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    if initial_state is not None or output_final_state:
        if causal and order == 2 and inference and not triton and not decode and q.shape[2] > 1:
            if fast2_causal.supports(q, k, v):  # a prefill: the C++ kernel (one-token steps stay recurrent)
                return _order2_kernel_with_state(
                    q, k, v, temperature, padding_mask, initial_state, output_final_state, chunk_size or _ORDER2_CHUNK
                )
        # with a state: linear attention with fastmax's features of the normalized q and k
        def intra(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
            return fastmax_weight(qc @ kc.transpose(-1, -2) / temperature, order)

        return linear_attention_with_state(
            fast_normalize(q.float()), fast_normalize(k.float()), v, causal=causal,
            feature_map=FastmaxFeatureMap(order, temperature), padding_mask=padding_mask, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size, backend="triton" if triton else "torch",
            intra_weights=intra if causal else None, decode=decode,
        )
    if triton:
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return fast_attention_triton(
            q, k, v, causal=causal, order=order, temperature=temperature, key_mask=padding_mask
        ), None
    if causal and order == 2 and inference:
        return _causal_order2_inference(q, k, v, temperature, padding_mask, chunk_size or _ORDER2_CHUNK), None
    fmap = FastmaxFeatureMap(order, temperature)
    if inference:  # bidirectional or order 1 (causal order 2 at inference returned above)
        # the normalization inside the feature map: applied a segment at a time with it, never to the whole q and k
        # (under autograd the inputs are normalized first: a module built per call would break fullgraph tracing)
        qn, kn, fmap = q, k, _NormalizedFeatureMap(fmap)
    else:
        qn, kn = fast_normalize(q.float()), fast_normalize(k.float())
    if not causal:
        return bidirectional_linear_attention(qn, kn, v, feature_map=fmap, key_mask=padding_mask), None
    if order == 1:  # phi(q) . phi(k) = 1 + s costs as much as f(s) in D dimensions: the plain linear form
        return causal_linear_attention(qn, kn, v, feature_map=fmap, key_mask=padding_mask, chunk_size=chunk_size)

    def intra(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        return fastmax_weight(qc @ kc.transpose(-1, -2) / temperature, order)

    return causal_linear_attention(
        qn, kn, v, feature_map=fmap, intra_weights=intra, key_mask=padding_mask, chunk_size=chunk_size
    )


def fast_recurrent_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    order: int = 2,
    temperature: float = 1.0,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step of causal fastmax with its state updated in place (decoding on a `RecurrentCache`, which
    owns the state): the new key and value folded into (S, z), the new query read against them. Order 2 runs on the
    C++ kernel of `kernels/csrc/fast2_causal.cpp` where it is available (features built in a thread's buffer, each
    row of the 2145 x Dv state read and written once); otherwise the features and `recurrent_linear_step_`.

    Args:
        q: `[B, H, 1, D]`. k: `[B, Hkv, 1, D]`. v: `[B, Hkv, 1, Dv]`; raw (normalized here); Hkv divides H.
        state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])`, contiguous float32 over `FastmaxFeatureMap(order, temperature)`'s
            features of the normalized keys (`ops.linear.state_updatable_in_place`); updated in place.
        padding_mask: `[B, 1]` bool, False where the new key is padding (it does not enter the state).

    Returns:
        `[B, H, 1, Dv]` in v's dtype.
    """
    validate_fast_options(order, temperature)
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"fast_recurrent_step_ takes one token, got {q.shape[2]}; use fast_attention_with_state")
    if not state_updatable_in_place(state):
        raise ValueError(
            "fast_recurrent_step_ updates a contiguous float32 state (S, z) in place, got dtypes "
            f"{state[0].dtype} / {state[1].dtype}, contiguous {state[0].is_contiguous()} / {state[1].is_contiguous()}; "
            "use fast_attention_with_state"
        )
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *state)):
        raise ValueError("fast_recurrent_step_ updates the state in place and takes no autograd; use fast_attention_with_state")
    if order == 2 and fast2_causal.supports(q, k, v):
        out = fast2_causal.step_unchecked(q, k, v, state, temperature, padding_mask)
        return out if v.dtype == torch.float32 else out.to(v.dtype)
    fmap = FastmaxFeatureMap(order, temperature)
    kf = fmap(fast_normalize(k.float()))
    if padding_mask is not None:
        kf = kf * padding_mask[:, None, :, None].to(kf.dtype)
    return recurrent_linear_step_(fmap(fast_normalize(q.float())), kf, v, state)


def fast_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    order: int = 2,
    temperature: float = 1.0,
    padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """FAST fastmax attention in O(N): the output of `fast_attention_with_state` without a state.

    Args:
        q: `[B, H, N, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H.
        causal: attend to j <= i (True) or to all j (False).
        order: 1 or 2, the Taylor order of f.
        temperature: T > 0 dividing q_hat . k_hat (order 1 needs T >= 1).
        padding_mask: `[B, N]` bool, True for real tokens; padded keys get weight 0.
        backend: "auto" | "torch" | "triton".
        dropout_p: attention dropout, as keys dropped for every query (`hf_fastattn.ops.dropout.key_dropout`);
            pass 0 outside training.

    Returns:
        `[B, H, N, Dv]` in v's dtype.
    """
    return fast_attention_with_state(
        q, k, v, causal=causal, order=order, temperature=temperature, padding_mask=padding_mask,
        chunk_size=chunk_size, backend=backend, dropout_p=dropout_p,
    )[0]


def fast_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    order: int,
    temperature: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAST fastmax attention on the Triton linear-attention kernel (`chunk_linear_fwd_kernel`).

    f(s) = 1 + s (+ s^2 / 2) with s = q_hat . k_hat / T is a dot product of explicit features (`FastmaxFeatureMap`:
    [1, x / sqrt(T)] and, for order 2, the upper triangle of x x^T / T, F = 1 + D + D(D+1)/2). The features are
    built here in PyTorch (normalization, feature map, key mask) and fed to the kernel, which walks the feature
    dimension in blocks, so any head dimension works. Gradients flow through the features by autograd.

    Cost: order 2 stores q and k features of F = O(D^2) per token (D = 64: F = 2145); a dedicated kernel that built
    the quadratic features in registers from q_hat and k_hat would avoid that memory traffic (not done yet).

    Args:
        q, k: `[B, H, N, D]` raw queries and keys (normalized here as `fast_normalize`). v: `[B, H, N, Dv]`.
        causal: attend to j <= i (True) or all j (False).
        order: 1 or 2. temperature: T > 0 (order 1 needs T >= 1 for non-negative weights).
        key_mask: `[B, N]` bool, True for real tokens; masked keys get weight 0.

    Returns:
        `[B, H, N, Dv]` in v's dtype; differentiable in q, k, v.
    """
    from ..kernels._jit import check_dtypes
    from ..kernels.linear_attn import linear_attention_triton

    check_dtypes("fast_attention_triton", q, k, v)
    if order not in (1, 2):
        raise ValueError(f"fast_attention_triton: order must be 1 or 2, got {order!r}")
    if not temperature > 0:
        raise ValueError(f"fast_attention_triton: temperature must be > 0, got {temperature!r}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "fast_attention_triton: expected q, k [B, H, N, D] of one shape and v [B, H, N, Dv] (same heads), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    fmap = FastmaxFeatureMap(order, temperature)
    # fp32 features for fp32 inputs; 16-bit features halve the prologue's memory for 16-bit inputs
    feat_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    qf = fmap(fast_normalize(q.float())).to(feat_dtype)
    kf = fmap(fast_normalize(k.float()))
    if key_mask is not None:
        if tuple(key_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"fast_attention_triton: key_mask must be [B, N] = {(q.shape[0], q.shape[2])}")
        kf = kf * key_mask.to(device=kf.device, dtype=kf.dtype)[:, None, :, None]
    out, _ = linear_attention_triton(qf, kf.to(feat_dtype), v, causal=causal)
    return out
