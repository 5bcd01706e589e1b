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
"""

from __future__ import annotations

import torch

from .dropout import key_dropout
from .feature_maps import FastmaxFeatureMap
from .linear import bidirectional_linear_attention, causal_linear_attention, use_triton
from .reference import fast_normalize, fastmax_weight


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
    """FAST fastmax attention in O(N).

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
    validate_fast_options(order, temperature)
    v = key_dropout(v, dropout_p)
    if use_triton(backend, q, k, v):
        from ..kernels import fast_attention_triton

        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return fast_attention_triton(
            q, k, v, causal=causal, order=order, temperature=temperature, key_mask=padding_mask
        )
    qn, kn = fast_normalize(q.float()), fast_normalize(k.float())
    fmap = FastmaxFeatureMap(order, temperature)
    if not causal:
        return bidirectional_linear_attention(qn, kn, v, feature_map=fmap, key_mask=padding_mask)

    def intra(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        return fastmax_weight(qc @ kc.transpose(-1, -2) / temperature, order)

    out, _ = causal_linear_attention(
        qn, kn, v, feature_map=fmap, intra_weights=intra, key_mask=padding_mask, chunk_size=chunk_size
    )
    return out
