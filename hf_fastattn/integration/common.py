"""Helpers shared by the attention variants' transformers glue (`*_attention.py`): the 2D padding-mask builder
registered for the O(N) variants, the checks of the padding mask and of causality, and the once-per-module
compatibility check. Imports nothing of the glue files, so each of them can import it without a cycle."""

from __future__ import annotations

import torch

from .compatibility import check_compatible

_CHECKED = "_fastattn_checked_for"


def check_supported(module: torch.nn.Module, implementation: str) -> None:
    """Raise a ValueError unless `implementation` can serve `module`'s model (for configs whose implementation was
    assigned by hand, past the checks made when it is set); checked once per module and implementation."""
    if module.__dict__.get(_CHECKED) != implementation:
        check_compatible(type(module), module.config, implementation)
        module.__dict__[_CHECKED] = implementation


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder for the O(N) variants: the 2D padding mask `[B, kv_length]` (True = real token), or None."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return None if bool(mask.all()) else mask


def _key_padding(attention_mask: torch.Tensor | None, kv_length: int, implementation: str) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"hf_fastattn {implementation!r} attention takes a 2D padding mask [batch, keys] (True = attend); got a "
            f"{attention_mask.dim()}D mask of shape {tuple(attention_mask.shape)}. Custom 4D masks are not supported."
        )
    if attention_mask.shape[-1] != kv_length:
        raise ValueError(f"padding mask covers {attention_mask.shape[-1]} keys but attention has {kv_length}")
    return attention_mask


def check_chunk_size(chunk_size) -> None:
    """The `chunk_size` option: a positive int, or None (chosen by the operator)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fastattn option chunk_size must be a positive int or None (auto), got {chunk_size!r}")


def check_backend(backend) -> None:
    """The `backend` option: "auto", "torch" or "triton"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"fastattn option backend must be 'auto', 'torch' or 'triton', got {backend!r}")
