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
