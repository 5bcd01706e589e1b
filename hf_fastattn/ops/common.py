"""Helpers the operator families share, each written once: the backend choice, K/V head grouping and repetition (GQA), the
allowed-key mask, FAST's normalization and weight, and the Child et al. sparse pattern rule.

The efficient operators (`linear.py`, `fast.py`, `sparse.py`, `hybrid.py`), the integration layer and conversion take
these from here; `reference.py` (the naive references, for tests) builds on them too, and nothing in the library
imports `reference.py`.
"""

from __future__ import annotations

import torch


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether `backend` ("auto" | "torch" | "triton", or $HF_FASTATTN_BACKEND) picks the Triton kernels for an
    operator call on `tensors` (`hf_fastattn.kernels.dispatch.resolve_backend`; triton is not imported here)."""
    from ..kernels.dispatch import resolve_backend

    return resolve_backend(backend, *tensors) == "triton"


def group_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
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


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat the K/V heads of `x` `[B, Hkv, N, D]` so that it has `num_heads` heads (GQA / MQA)."""
    hkv = x.shape[1]
    if num_heads % hkv != 0:
        raise ValueError(f"the number of query heads ({num_heads}) must be a multiple of the K/V heads ({hkv})")
    return x if hkv == num_heads else x.repeat_interleave(num_heads // hkv, dim=1)


def allowed_mask(
    n_q: int, n_k: int, *, causal: bool, padding_mask: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """`[B or 1, 1, Nq, Nk]` bool: which keys each query may see. Queries are the last `n_q` positions."""
    i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    allowed = (j <= i) if causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].to(device=allowed.device, dtype=torch.bool)
    return allowed


def fast_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean-centre and L2-normalize each token vector over its last dimension (fastmax's q-hat / k-hat)."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def fastmax_weight(s: torch.Tensor, order: int) -> torch.Tensor:
    """f(s) = sum_{l <= order} s^l / l!, the Taylor truncation of exp(s)."""
    return 1 + s if order == 1 else 1 + s + 0.5 * s * s


def sparse_pattern_rows(
    first: int,
    n: int,
    *,
    causal: bool,
    pattern: str = "strided",
    stride: int,
    local: int | None = None,
    summary: int = 1,
    device=None,
) -> torch.Tensor:
    """`[N - first, N]` bool: the Child et al. 2019 pattern (both heads merged into one allowed set) for the queries
    at positions first .. N - 1 against the N keys. The one statement of the rule in PyTorch (the Triton kernel's
    blocks apply the same arithmetic in `kernels/block_sparse.py`):

    "strided": |i - j| < local (default stride) or |i - j| a multiple of stride.
    "fixed":   floor(i / stride) == floor(j / stride) or j mod stride >= stride - summary.
    """
    i = torch.arange(first, n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    if pattern == "strided":
        dist = (i - j).abs()
        allowed = (dist < (stride if local is None else local)) | (dist % stride == 0)
    elif pattern == "fixed":
        allowed = (i // stride == j // stride) | (j % stride >= stride - summary)
    else:
        raise ValueError(f"pattern must be 'strided' or 'fixed', got {pattern!r}")
    if causal:
        allowed = allowed & (j <= i)
    return allowed


def sparse_pattern_mask(
    n: int,
    *,
    causal: bool,
    pattern: str = "strided",
    stride: int,
    local: int | None = None,
    summary: int = 1,
    device=None,
) -> torch.Tensor:
    """`[N, N]` bool: the Child et al. 2019 pattern for N queries and keys (`sparse_pattern_rows` from 0)."""
    return sparse_pattern_rows(
        0, n, causal=causal, pattern=pattern, stride=stride, local=local, summary=summary, device=device
    )


__all__ = [
    "allowed_mask",
    "group_heads",
    "fast_normalize",
    "fastmax_weight",
    "repeat_kv",
    "sparse_pattern_mask",
    "sparse_pattern_rows",
    "use_triton",
]
