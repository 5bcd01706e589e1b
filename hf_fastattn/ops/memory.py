"""Fresh CPU buffers that fault in 2 MiB pages at a time.

A new tensor's pages are mapped by the kernel at first write, 4 KiB at a time: for the 32 MiB output of a 16K-token
attention that is ~8,000 page faults, measured at ~20 ms on this project's 2-core machine, a fifth of the whole
linear-attention forward. Where Linux allows transparent huge pages on request (`/sys/kernel/mm/
transparent_hugepage/enabled` set to "madvise" or "always"), `empty` asks for them with `madvise(MADV_HUGEPAGE)` on
the 2 MiB-aligned part of a fresh allocation before anything touches it: the same buffer then faults ~500x less
(measured ~8 ms). torch does the same for every allocation when the process starts with `THP_MEM_ALLOC_ENABLE=1`;
this asks only for the operators' own large buffers. Elsewhere (other systems, GPUs, small sizes) it is
`torch.empty`.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MIN_BYTES = 2 * _HUGE_PAGE  # below this there is at most one aligned huge page inside


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(x: torch.Tensor) -> bool:
    """Ask for huge pages under `x`'s storage (call before writing to it). Returns whether the advice was taken."""
    nbytes = x.untyped_storage().nbytes()
    if _madvise is None or x.device.type != "cpu" or nbytes < _MIN_BYTES:
        return False
    address = x.untyped_storage().data_ptr()
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and _madvise(start, end - start, _MADV_HUGEPAGE) == 0


def empty(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`like.new_empty(shape, dtype=dtype)`, on huge pages where the system gives them (see the module)."""
    x = like.new_empty(shape, dtype=dtype or like.dtype)
    if advise_huge_pages(x):
        _fault_in(x)
    return x


def _fault_in(x: torch.Tensor) -> None:
    """Touch one element per huge page of `x`, in this thread, so the kernel maps its pages before the operators'
    parallel writes do: two threads faulting the same 2 MiB page wait on each other while it is zeroed, which made
    the linear-attention forward 1.7x slower on 2 threads than without huge pages (measured at N=16K; 1 thread
    unchanged). One strided write of a few elements (too few for torch to split over threads); `x` is the fresh,
    contiguous, non-empty tensor `empty` made."""
    x.view(-1)[:: _HUGE_PAGE // x.element_size()].zero_()
