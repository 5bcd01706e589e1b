"""Lazy `triton.jit`: decorate a kernel at its first launch, once per mode (compiled or interpreted).

`triton.jit` chooses the interpreter when the decorator runs (if `TRITON_INTERPRET` is set then). Decorating at
import would freeze the mode of whoever imported us first; decorating at launch follows the environment. (Triton's
own library is decorated at `import triton`, so CPU runs still need TRITON_INTERPRET=1 before that: see dispatch.)
"""

from __future__ import annotations

import triton


class LazyKernel:
    """Holds a plain kernel function; `kernel[grid](...)` decorates it for the current mode and launches it."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: dict[bool, object] = {}

    def jitted(self):
        mode = bool(triton.knobs.runtime.interpret)
        kernel = self._compiled.get(mode)
        if kernel is None:
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        return self.jitted()[grid]


def lazy_jit(fn) -> LazyKernel:
    return LazyKernel(fn)


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def dot_precision(*tensors) -> str:
    """ "ieee" for fp32 inputs (exact fp32 products), "tf32" for 16-bit inputs (their products are exact in tf32)."""
    import torch

    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def check_dtypes(name: str, *tensors) -> None:
    import torch

    allowed = (torch.float32, torch.bfloat16, torch.float16)
    for t in tensors:
        if t.dtype not in allowed:
            raise TypeError(f"{name}: the Triton kernel supports dtypes {allowed}, got {t.dtype}")
