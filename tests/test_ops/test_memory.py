"""`hf_fastattn.ops.memory`: large operator buffers asked onto huge pages, same tensors otherwise; freed memory
reused while `reuse_freed_memory` is on (uptraining)."""

import resource
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


# reuse of freed memory (`reuse_freed_memory`, on while `uptrain` runs)

needs_glibc = pytest.mark.skipif(memory._glibc_malloc is None, reason="glibc's malloc only (Linux with glibc)")
MIB = 1 << 20


# run in a fresh interpreter: what malloc does with a block depends on the arenas and mappings the process already
# has, which other tests change (in the suite the same check once saw every page fault again inside)
_FAULTS_SCRIPT = """
import json, resource, sys
import torch
from hf_fastattn.ops import memory

def faults_of_a_fresh_tensor(nbytes):
    # minor page faults of allocating and filling a tensor of nbytes, after one of the same size was freed
    warm = torch.empty(nbytes // 4)
    warm.fill_(1.0)
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(nbytes // 4)
    x.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
    return faults

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

nbytes = int(sys.argv[1])
result = {"before": faults_of_a_fresh_tensor(nbytes)}
with memory.reuse_freed_memory() as applied:
    result["applied"] = applied
    result["inside"] = [faults_of_a_fresh_tensor(nbytes) for _ in range(3)]
    with memory.reuse_freed_memory() as nested:
        result["nested"] = nested
    result["resident_inside"] = resident_bytes()  # the freed tensors' pages kept
result["resident_after"] = resident_bytes()  # handed back (malloc_trim)
print(json.dumps(result))
"""


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@needs_glibc
def test_freed_memory_is_reused_inside_and_given_back_after():
    """Outside, a large tensor freed and allocated again faults its pages in afresh; inside it reuses the same pages
    (almost no page faults), which stay resident until the way out hands them back. (After the way out a freed heap
    block may still serve the next tensor, so only the memory handed back is checked there.)"""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in memory._MALLOC_ENVIRONMENT}
    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so mapped afresh by default
    nbytes = 64 * MIB
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, str(nbytes)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    pages = nbytes // resource.getpagesize()
    assert result["applied"] and not result["nested"]  # applied once; the outer one restores
    # the heap grows on the first ones (sometimes twice: measured 0 or all pages), then its pages are reused, as a
    # training loop's steps reuse the last one's
    assert result["inside"][-1] < pages // 20, result
    if not _transparent_huge_pages_always():  # with huge pages everywhere a fresh tensor faults ~500x less
        assert result["before"] > pages // 2, result
    assert result["resident_inside"] - result["resident_after"] > nbytes // 2, result


@needs_glibc
def test_the_users_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    with memory.reuse_freed_memory() as applied:
        assert not applied
