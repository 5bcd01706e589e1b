"""The CPU kernels of `csrc/` (C++ with AVX-512), each compiled the first time it is asked for in a process.

`torch.utils.cpp_extension.load` (a C++ compiler and ninja needed) builds into torch's extension cache
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`): about 30 s once per machine and source. A kernel is
not offered (`CpuExtension.load()` returns None) without AVX-512, when its build fails (a warning says why) or when
`HF_FASTATTN_CPU_KERNELS=0`; its callers then take their torch paths.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

ENV_VAR = "HF_FASTATTN_CPU_KERNELS"
_CSRC = Path(__file__).with_name("csrc")


class CpuExtension:
    """One source of `csrc/`, built on the first `load()`; later calls return the same module (or None)."""

    def __init__(self, name: str, source: str):
        self.name = name
        self.source = _CSRC / source
        self._module = None
        self._tried = False

    def load(self):
        if self._tried:
            return self._module
        self._tried = True
        if os.environ.get(ENV_VAR, "1") == "0":
            return None
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            return None
        try:
            from torch.utils.cpp_extension import load

            self._module = load(
                name=self.name,
                sources=[str(self.source)],
                extra_cflags=["-O3", "-mavx512f", "-mfma", "-fopenmp"],  # (OpenMP: at::parallel_for's threads)
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # no compiler, no ninja, a failed build: the torch paths remain
            warnings.warn(f"hf_fastattn: the CPU kernel {self.source.name} could not be built ({err}); not using it", stacklevel=3)
            self._module = None
        return self._module

    def call(self, op, function: str, *args, mutated: tuple[torch.Tensor, ...] = ()) -> None:
        """Run the kernel `function` (built) on `args`: under `torch.compile` through its torch operator `op` (so the
        graph keeps it), in eager mode directly, where the operator's Python dispatch costs about 30 us a call (a
        third of FAST's one-token decoding step at 8 heads of 64). The tensors written in place (`mutated`, the op's
        `mutates_args`) get their version counters bumped as the operator would, so autograd still sees them
        change."""
        if torch.compiler.is_compiling():
            op(*args)
            return
        getattr(self._module, function)(*args)
        if mutated:
            torch.autograd.graph.increment_version(mutated)
