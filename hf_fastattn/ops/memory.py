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

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

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


# glibc's mallopt parameters and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
# the user's own malloc settings, which `reuse_freed_memory` leaves alone
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def _load_glibc_malloc():
    """(mallopt, malloc_trim) of glibc, or None (another system or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only: musl has mallopt but not its parameters)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, malloc_trim


_glibc_malloc = _load_glibc_malloc()
_reusing = False  # inside `reuse_freed_memory`


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Inside, glibc's malloc serves large CPU tensors from its heap and keeps what is freed for the next ones, as
    jemalloc or tcmalloc would, instead of mapping fresh pages for each and unmapping them when freed (the default
    above 128 KiB to 32 MiB). A training step allocates and frees the same large tensors step after step (at 2 x
    2048 tokens and a 49K vocabulary, 0.8 GB of logits): with fresh pages each time, faulting them in is a large part of
    the step. Measured on SmolLM2-135M, 2 x 2048-token steps of stage 2 (distillation) on 2 cores of
    an AMD EPYC: float32 58 -> 46 s per step, bfloat16 autocast 39 -> 30 s. The price: the process keeps its peak
    memory while inside (it is handed back, `malloc_trim`, on the way out). Yields whether it applies: not outside
    glibc, nor when the environment sets malloc's own parameters (`MALLOC_MMAP_MAX_`, `GLIBC_TUNABLES`, ...), which
    are left as the user set them; nested uses apply once. A thread whose malloc arena is not the main one still maps
    blocks above 64 MiB afresh (glibc's per-thread heaps are at most that size)."""
    global _reusing
    if _glibc_malloc is None or _reusing or any(name in os.environ for name in _MALLOC_ENVIRONMENT):
        yield False
        return
    mallopt, malloc_trim = _glibc_malloc
    _reusing = True
    try:
        mallopt(_M_MMAP_MAX, 0)  # no mmap: large blocks come from the heap, and go back to it
        mallopt(_M_TRIM_THRESHOLD, -1)  # never trim the heap's free top (-1: glibc takes it as SIZE_MAX)
        yield True
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        malloc_trim(0)
        _reusing = False
