"""Deprecated: `fast_attention_triton` is PyTorch code around the Triton linear-attention kernel, not a kernel of
its own; it moved to `hf_fastattn.ops.fast`. This module re-exports it for one release (0.2 removes it)."""

from ..ops.fast import fast_attention_triton

__all__ = ["fast_attention_triton"]
