"""A CPU kernel for linear layers over a few rows (`csrc/rows_linear.cpp`), compiled on first use.

`rows_linear(x, weight, bias)` is `F.linear` for float32 `[M, K]` x with M small (the tokens of a speculative
forward), streaming the weight once: on an AVX-512 CPU, M = 4..12 rows cost 30-40% less than MKL's sgemm (see the
source). It is one of the routes `generation.fastpath.RowPlan` measures; nothing else uses it.

Compiled on first use by `cpu_build.CpuExtension` (once per machine, about 30 s); not offered (`available()` is
False) without AVX-512, when the build fails or when `HF_FASTATTN_CPU_KERNELS=0`.
"""

from __future__ import annotations

import torch

from .cpu_build import CpuExtension

_EXTENSION = CpuExtension("hf_fastattn_rows_linear", "rows_linear.cpp")


def available() -> bool:
    """Whether `rows_linear` can run here (compiling it now if needed)."""
    return _EXTENSION.load() is not None


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for float32 CPU `[M, K]` x and a contiguous `[N, K]` weight, no autograd.

    Raises:
        RuntimeError: the kernel is not available here (`available()`), or the inputs are not as above.
    """
    module = _EXTENSION.load()
    if module is None:
        raise RuntimeError("rows_linear: the CPU kernel is not available here (see hf_fastattn.kernels.rows_linear)")
    return module.rows_linear(x, weight, bias)
