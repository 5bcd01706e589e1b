"""A CPU kernel for linear layers over a few rows (`csrc/rows_linear.cpp`), compiled on first use.

`rows_linear(x, weight, bias)` is `F.linear` for float32 `[M, K]` x with M small (the tokens of a speculative
forward), streaming the weight once: on an AVX-512 CPU, M = 4..12 rows cost 30-40% less than MKL's sgemm (see the
source). It is one of the routes `generation.fastpath.RowPlan` measures; nothing else uses it.

The source is compiled with `torch.utils.cpp_extension.load` (a C++ compiler and ninja needed) the first time it is
asked for in a process, into torch's extension cache (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`:
compiled once per machine, about 30 s). It is not offered (`available()` is False) without AVX-512, when the build
fails (a warning says why) or when `HF_FASTATTN_CPU_KERNELS=0`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "rows_linear.cpp"
_module = None
_tried = False


def available() -> bool:
    """Whether `rows_linear` can run here (compiling it now if needed)."""
    return _load() is not None


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for float32 CPU `[M, K]` x and a contiguous `[N, K]` weight, no autograd.

    Raises:
        RuntimeError: the kernel is not available here (`available()`), or the inputs are not as above.
    """
    module = _load()
    if module is None:
        raise RuntimeError("rows_linear: the CPU kernel is not available here (see hf_fastattn.kernels.rows_linear)")
    return module.rows_linear(x, weight, bias)


def _load():
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("HF_FASTATTN_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return None
    try:
        from torch.utils.cpp_extension import load

        _module = load(
            name="hf_fastattn_rows_linear",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-mavx512f", "-mfma", "-fopenmp"],  # (OpenMP: at::parallel_for's threads)
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the other routes remain
        warnings.warn(f"hf_fastattn: the CPU kernel rows_linear could not be built ({err}); not using it", stacklevel=3)
        _module = None
    return _module
