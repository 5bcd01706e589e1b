"""`hf-fastattn bench attention`: time and peak memory of the attention operators against N.

Causal forward and forward+backward, B=1, H=8, D=64, fp32 on this CPU, for torch SDPA, linear (elu+1), fast
(order 1 and 2) and sparse (strided, stride 128), all in one run so that the ratios to SDPA are measured side by
side. Prints a markdown table and writes a PNG plot.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from ..integration.variants import benchmark_entries
from .utils import best_time, format_table, machine_line, peak_memory_mib

# torch SDPA, then each registered variant's operator calls (`register_attention_variant(..., benchmarks=...)`):
# linear (elu+1), fast-1, fast-2, sparse (strided, stride 128)
METHODS = {
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    **benchmark_entries(),
}


def _runner(method: str, n: int, mode: str, heads: int, dim: int):
    """A closure running one causal call (mode "fwd") or call + backward (mode "fwd+bwd") on fresh inputs."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=grad) for _ in range(3))
    fn = METHODS[method]

    def run():
        if grad:
            fn(q, k, v).sum().backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    return run


def _peak_in_fresh_process(method: str, n: int, mode: str, heads: int, dim: int, threads: int = 0) -> float:
    if threads:
        torch.set_num_threads(threads)
    return peak_memory_mib(_runner(method, n, mode, heads, dim))


def measure(method: str, n: int, mode: str, *, heads: int, dim: int, repeats: int, pool) -> tuple[float, float]:
    """(best seconds, peak MiB). Memory is measured in a fresh process: in this one, memory freed by earlier
    runs and kept by the allocator would hide new allocations."""
    seconds = best_time(_runner(method, n, mode, heads, dim), repeats=repeats, warmup=1 if n <= 8192 else 0)
    gc.collect()
    if pool is None:
        return seconds, _peak_in_fresh_process(method, n, mode, heads, dim)
    return seconds, pool.submit(_peak_in_fresh_process, method, n, mode, heads, dim, torch.get_num_threads()).result()


def plot(results: dict, lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in METHODS:
        for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            xs = [n for n in lengths if (method, n, mode) in results]
            if not xs:
                continue
            axes[0 if mode == "fwd" else 1].plot(xs, [results[method, n, mode][0] for n in xs], style, label=method)
            if mode == "fwd":
                axes[2].plot(xs, [results[method, n, mode][1] for n in xs], style, label=method)
    for ax, title, unit in zip(axes, ("causal forward", "causal forward+backward", "peak memory, forward"),
                               ("seconds", "seconds", "MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=unit, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"B=1, H=8, D=64, fp32, {machine_line()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn bench attention", description=__doc__)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
        help="sequence lengths N (default: %(default)s)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help="attention operators to time (default: %(default)s)",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
        help="forward only, and/or forward and backward (default: %(default)s)",
    )
    parser.add_argument("--heads", type=int, default=8, help="attention heads H (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=64, help="head dimension D (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point, the best kept (default: %(default)s)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for attention.png and attention.md (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch threads for every method (0: torch's default); 1 gives steadier ratios on a loaded machine"
        " (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.repeats, args.heads, args.dim = [256, 512], 1, 2, 16
    os.makedirs(args.out, exist_ok=True)

    results: dict[tuple[str, int, str], tuple[float, float]] = {}
    rows = []
    # --quick measures memory in this process (spawning ~4 s a process would dominate a smoke test)
    pool = None if args.quick else ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
    )
    for n in args.lengths:
        for mode in args.modes:
            for method in args.methods:
                results[method, n, mode] = measure(
                    method, n, mode, heads=args.heads, dim=args.dim, repeats=args.repeats, pool=pool
                )
            base = results.get(("sdpa", n, mode))
            for method in args.methods:
                seconds, mib = results[method, n, mode]
                speedup = base[0] / seconds if base else float("nan")
                rows.append([n, mode, method, round(seconds * 1e3, 1), f"{speedup:.2f}x", round(mib)])
                print(f"N={n:>6} {mode:>8} {method:>7}: {seconds * 1e3:9.1f} ms  {speedup:6.2f}x sdpa  {mib:7.0f} MiB",
                      flush=True)
    table = format_table(["N", "mode", "method", "ms", "speed-up vs sdpa", "peak MiB"], rows)
    print(f"\n{machine_line()}, B=1, H={args.heads}, D={args.dim}, fp32, causal\n")
    print(table)
    command = " ".join(["hf-fastattn bench attention", *(argv or [])])
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(f"`{command}`\n\n{machine_line()}, B=1, H={args.heads}, D={args.dim}, fp32, causal\n\n{table}\n")
    plot(results, args.lengths, os.path.join(args.out, "attention.png"))
    if pool is not None:
        pool.shutdown()
    print(f"\nwrote {args.out}/attention.md and {args.out}/attention.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
