"""Small helpers shared by the benchmarks: timing, peak memory on CPU, tables and plots."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Sequence

import torch


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """The best of `repeats` wall-clock runs of `fn` in seconds, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory added while `fn` runs, in MiB (Linux: resets VmHWM through /proc/self/clear_refs).

    On CUDA tensors use torch.cuda.max_memory_allocated instead; this measures the CPU process.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    fn()
    return max(0.0, _status_mib("VmHWM") - before)


def cache_nbytes(cache) -> int:
    """Bytes a transformers cache holds: `RecurrentCache.nbytes()` (constant in the context), or the K/V tensors of
    every layer of a `DynamicCache` (growing with it)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (printable in a terminal and pasteable into the README)."""
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch threads (None or 0: leave the count as it is), then restore the count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_line(threads: bool = True) -> str:
    """torch version, current torch threads (unless `threads` is False: reports whose sections set their own) and CPUs."""
    used = f"{torch.get_num_threads()} threads, " if threads else ""
    return f"torch {torch.__version__}, {used}{os.cpu_count()} CPUs"


def crossover(decoding: list[dict], model: str, baseline: str, key: str) -> dict:
    """Where `model`'s `key` (a cost such as "s_per_token" or "cache_bytes") drops to `baseline`'s or below, along
    the measured contexts of `decoding` (records with "model", "context" and `key`): {"status": "crosses", "from": context (interpolated in log context)}, {"status": "always"} (already at
    the smallest context) or {"status": "never"} (not within the measured range; "up_to" says how far it went)."""
    ours = {d["context"]: d[key] for d in decoding if d["model"] == model}
    theirs = {d["context"]: d[key] for d in decoding if d["model"] == baseline}
    contexts = sorted(set(ours) & set(theirs))
    gaps = [ours[c] - theirs[c] for c in contexts]  # > 0: the baseline is still ahead
    for i, gap in enumerate(gaps):
        if gap <= 0:
            if i == 0:
                return {"status": "always", "from": contexts[0]}
            lo, hi = math.log(contexts[i - 1]), math.log(contexts[i])
            at = math.exp(lo + (hi - lo) * gaps[i - 1] / (gaps[i - 1] - gap))
            return {"status": "crosses", "from": int(round(at))}
    return {"status": "never", "up_to": contexts[-1] if contexts else 0}


def describe_crossover(c: dict) -> str:
    if c["status"] == "crosses":
        return f"from about {c['from']:,} tokens"
    if c["status"] == "always":
        return f"already at {c['from']:,} tokens"
    return f"not up to {c['up_to']:,} tokens"


def with_attention(model, implementation: str, **options):
    """A copy of `model` with `implementation` set as a user sets it (`configure(**options)`, then
    `set_attn_implementation`); `model` itself is left as it is."""
    from ...integration.registry import configure

    swapped = copy.deepcopy(model)
    if options:
        configure(swapped, **options)
    swapped.set_attn_implementation(implementation)
    return swapped
