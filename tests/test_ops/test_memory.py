"""`hf_fastattn.ops.memory`: large operator buffers asked onto huge pages, same tensors otherwise."""

import sys

import pytest
import torch

from hf_fastattn.ops import memory


def test_empty_matches_new_empty():
    like = torch.zeros(2, dtype=torch.float64)
    x = memory.empty(3, 1 << 20, like=like)
    assert x.shape == (3, 1 << 20) and x.dtype == torch.float64 and x.device == like.device
    assert memory.empty(4, like=like, dtype=torch.float32).dtype == torch.float32


def test_small_buffers_are_not_advised():
    assert not memory.advise_huge_pages(torch.empty(1024))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_large_buffers_are_advised_where_the_system_allows():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            allowed = "[never]" not in f.read()
    except OSError:
        allowed = False
    x = torch.empty(8 << 20)  # 32 MiB
    assert memory.advise_huge_pages(x) == allowed
    x.fill_(1.5)  # the advice changes how pages are mapped, never the values
    assert x.sum().item() == 1.5 * x.numel()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(memory._madvise is None, reason="no transparent huge pages on request here")
def test_advised_buffers_are_mapped_before_the_operator_writes():
    """On huge pages, `empty` faults the buffer in from the calling thread (one touch per 2 MiB page), so that
    parallel writes do not fault the same page from two threads: the memory is resident when `empty` returns, while
    a plain `torch.empty` of the same size is not."""
    before = _resident_bytes()
    plain = torch.empty(16 << 20)  # 64 MiB, untouched
    after_plain = _resident_bytes()
    advised = memory.empty(16 << 20, like=plain)
    after_advised = _resident_bytes()
    assert after_plain - before < 8 << 20
    assert after_advised - after_plain > 48 << 20
    assert advised.shape == plain.shape
