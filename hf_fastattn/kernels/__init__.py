"""Triton kernels (GPU, or CPU under TRITON_INTERPRET=1). Importing this package does not import triton:
the kernel functions load their module on first use."""

from __future__ import annotations

import importlib

from .dispatch import BACKENDS, resolve_backend

_LAZY = {
    "linear_attention_triton": "linear_attn",
    "recurrent_linear_step_triton": "linear_attn",
    "fast_attention_triton": "fastmax",
    "sparse_attention_triton": "block_sparse",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["BACKENDS", "resolve_backend", *_LAZY]
