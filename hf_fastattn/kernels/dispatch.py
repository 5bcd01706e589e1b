"""Backend choice for the operators: "torch" (any device) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    backend = os.environ.get("HF_FASTATTN_BACKEND", backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch"
    return backend
