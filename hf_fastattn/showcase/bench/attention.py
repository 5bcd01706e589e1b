"""`hf-fastattn bench attention`: time, achieved GFLOP/s and peak memory of the attention operators against N.

Forward and forward+backward, causal and bidirectional, B=1, H=8, D=64, fp32 on this CPU, for torch SDPA, linear
(elu+1), fast (order 1 and 2) and sparse (strided and fixed, stride 128), one row per torch thread count. All
methods of one (threads, N, direction, mode) are timed in one loop with their repetitions interleaved, so that the
ratios to SDPA are measured side by side on a shared machine. Also times one decoding step of fast order 2 and of
linear (the recurrent form). Prints a markdown table with the issue's targets met or not, and writes a PNG plot.

GFLOP/s counts, per method, the multiply-adds (2 flops each) of the matmuls its algorithm performs (`flops`); a
backward is counted as twice its forward (fwd+bwd = 3x the forward's count), for every method alike.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from ...integration.variants import benchmark_entries
from ...ops import (
    fast_attention,
    fast_recurrent_step_,
    linear_attention,
    recurrent_linear_step_,
    sparse_attention,
)
from ...ops.feature_maps import EluFeatureMap, FastmaxFeatureMap
from .utils import format_table, machine_line, peak_memory_mib, torch_threads

STRIDE = 128
LINEAR_CHUNK = 64  # `ops.linear._FAST_CHUNK`: the chunk the counts below assume (linear, fast-1)
FAST2_CHUNK = 64  # `ops.fast._ORDER2_CHUNK`

BUILTIN = {  # the built-in operators, causal or bidirectional
    "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "linear": lambda q, k, v, causal: linear_attention(q, k, v, causal=causal, backend="torch"),
    "fast-1": lambda q, k, v, causal: fast_attention(q, k, v, causal=causal, order=1, backend="torch"),
    "fast-2": lambda q, k, v, causal: fast_attention(q, k, v, causal=causal, order=2, backend="torch"),
    "sparse": lambda q, k, v, causal: sparse_attention(
        q, k, v, causal=causal, pattern="strided", stride=STRIDE, backend="torch"
    ),
    "sparse-fixed": lambda q, k, v, causal: sparse_attention(
        q, k, v, causal=causal, pattern="fixed", stride=STRIDE, backend="torch"
    ),
}
# sdpa, the built-ins, then any other registered variant's benchmark entries (causal only, `fn(q, k, v)`)
METHODS = {**BUILTIN, **{
    label: (lambda q, k, v, causal, fn=fn: fn(q, k, v)) for label, fn in benchmark_entries().items()
    if label not in BUILTIN
}}
CAUSAL_ONLY = set(METHODS) - set(BUILTIN)


def _linear_form_flops(n: int, f: int, dv: int, d_intra: int, chunk: int, causal: bool) -> float:
    """Per head: causal, C x C weights per chunk (2 N C d_intra), their product with v (2 N C Dv), each chunk's
    state k^T v and its read q . S (4 N F Dv), denominators (2 N F); bidirectional: the state and its read only."""
    if not causal:
        return 4 * n * f * dv + 4 * n * f
    return 2 * n * chunk * (d_intra + dv) + 4 * n * f * dv + 2 * n * f


def flops(method: str, n: int, heads: int, dim: int, causal: bool) -> float:
    """Forward flops of `method` at B=1: 2 per multiply-add of the matmuls its algorithm performs."""
    if method == "sdpa":  # q k^T and p v over the allowed pairs (flash attention skips the masked blocks)
        pairs = n * (n + 1) / 2 if causal else n * n
        return 4 * dim * pairs * heads
    if method == "linear":
        return heads * _linear_form_flops(n, dim, dim, dim, LINEAR_CHUNK, causal)
    if method == "fast-1":  # the linear form on features [1, x]: intra-chunk weights in feature space
        return heads * _linear_form_flops(n, dim + 1, dim, dim + 1, LINEAR_CHUNK, causal)
    if method == "fast-2":  # intra-chunk weights in D dimensions, the state in F = 1 + D + D(D+1)/2 features
        f = 1 + dim + dim * (dim + 1) // 2
        return heads * _linear_form_flops(n, f, dim, dim, FAST2_CHUNK, causal)
    if method.startswith("sparse"):  # the pairs of the blocks computed (a superset of the allowed pairs)
        return 4 * dim * heads * sparse_pairs(method, n, causal)
    return float("nan")  # a registered variant's operator: its arithmetic is not known here


def sparse_pairs(method: str, n: int, causal: bool) -> float:
    """(query, key) pairs whose scores the sparse operator computes, stride 128 (see `ops.sparse`)."""
    blocks = -(-n // STRIDE)
    if method == "sparse":  # band: blocks of `stride` queries against 2 (causal) or 3 blocks; periodic: m x m per residue
        return blocks * STRIDE * STRIDE * (2 if causal else 3) + STRIDE * blocks * blocks
    # fixed: the diagonal blocks and every query against the summary column of each block
    return blocks * STRIDE * STRIDE + n * blocks


def _runner(method: str, n: int, mode: str, causal: bool, heads: int, dim: int):
    """A closure running one call (mode "fwd", under no_grad) or call + backward (mode "fwd+bwd") on fixed inputs."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=grad) for _ in range(3))
    fn = METHODS[method]

    def run():
        if grad:
            fn(q, k, v, causal).sum().backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v, causal)

    return run


def _peak_in_fresh_process(method, n, mode, causal, heads, dim, threads=0) -> float:
    if threads:
        torch.set_num_threads(threads)
    return peak_memory_mib(_runner(method, n, mode, causal, heads, dim))


def time_interleaved(runners: dict, repeats: int, warmup: bool) -> dict[str, float]:
    """Best wall-clock seconds of each runner, the repetitions interleaved over runners (round-robin)."""
    if warmup:
        for run in runners.values():
            run()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def decode_step_times(heads: int, dim: int, steps: int = 50) -> dict[str, float]:
    """Median seconds of one recurrent decoding step (B=1, one token, fp32) on a state of F x Dv per head, updated in
    place, by the calls decoding on a `RecurrentCache` makes: linear (elu+1, F = D), the feature maps of the new q
    and k then `recurrent_linear_step_`; fast order 2 (F = 1 + D + D(D+1)/2), `fast_recurrent_step_` (the C++ step
    of `kernels/csrc/fast2_causal.cpp` where it is available). The two steps interleaved."""
    torch.manual_seed(0)
    elu = EluFeatureMap()
    steppers = {
        "linear": lambda q, k, v, state: recurrent_linear_step_(elu(q), elu(k), v, state),
        "fast-2": lambda q, k, v, state: fast_recurrent_step_(q, k, v, state, order=2, temperature=1.0),
    }
    features = {"linear": dim, "fast-2": FastmaxFeatureMap(2, 1.0).feature_dim(dim)}
    states = {name: (torch.rand(1, heads, f, dim), torch.rand(1, heads, f) + 1) for name, f in features.items()}
    times = {name: [] for name in steppers}
    with torch.no_grad():
        for i in range(steps + 5):
            q, k, v = (torch.randn(1, heads, 1, dim) for _ in range(3))
            for name, step in steppers.items():
                start = time.perf_counter()
                step(q, k, v, states[name])
                if i >= 5:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


TARGETS = [  # (method, direction, mode, minimum speed-up vs sdpa), issue 18, at N = 16384 and every thread count
    ("linear", "causal", "fwd", 40),
    ("linear", "causal", "fwd+bwd", 20),
    ("linear", "bidirectional", "fwd", 40),
    ("linear", "bidirectional", "fwd+bwd", 20),
    ("fast-2", "causal", "fwd", 3),
    ("sparse", "causal", "fwd", 5),
    ("sparse-fixed", "causal", "fwd", 5),
]
TARGET_N = 16384
DECODE_TARGET = 1.3  # fast-2 decoding step <= 1.3x the linear step


def target_lines(results: dict, decode: dict) -> list[str]:
    """'met' / 'NOT met' for each of the issue's targets the run measured, with the measured ratio."""
    lines = []
    for threads in sorted({key[0] for key in results}):
        for method, direction, mode, need in TARGETS:
            ours = results.get((threads, TARGET_N, direction, mode, method))
            base = results.get((threads, TARGET_N, direction, mode, "sdpa"))
            if ours is None or base is None:
                continue
            ratio = base[0] / ours[0]
            verdict = "met" if ratio >= need else "NOT met"
            lines.append(
                f"- {verdict}: {method} {direction} {mode} >= {need}x sdpa at N={TARGET_N}, {threads} thread(s) "
                f"(measured {ratio:.1f}x)"
            )
    for threads, steps in sorted(decode.items()):
        ratio = steps["fast-2"] / steps["linear"]
        verdict = "met" if ratio <= DECODE_TARGET else "NOT met"
        lines.append(
            f"- {verdict}: fast-2 decoding step <= {DECODE_TARGET}x the linear step, {threads} thread(s) (measured "
            f"{steps['fast-2'] * 1e3:.3f} ms vs {steps['linear'] * 1e3:.3f} ms: {ratio:.1f}x)"
        )
    return lines


def plot(results: dict, lengths: list[int], threads: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in METHODS:
        for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            key = lambda n, mode=mode, method=method: (threads, n, "causal", mode, method)  # noqa: E731
            xs = [n for n in lengths if key(n) in results]
            if not xs:
                continue
            axes[0 if mode == "fwd" else 1].plot(xs, [results[key(n)][0] for n in xs], style, label=method)
            measured = [n for n in xs if results[key(n)][1] > 0]  # NaN (--no-memory) and 0 MiB cannot be log-scaled
            if mode == "fwd" and measured:
                axes[2].plot(measured, [results[key(n)][1] for n in measured], style, label=method)
    titles = ("causal forward", "causal forward+backward", "peak memory, causal forward")
    for ax, title, unit in zip(axes, titles, ("seconds", "seconds", "MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=unit, title=title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"B=1, H=8, D=64, fp32, {threads} thread(s), {machine_line(threads=False)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn bench attention", description=__doc__)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 4096, 16384],
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
    parser.add_argument(
        "--directions", nargs="+", default=["causal", "bidirectional"], choices=["causal", "bidirectional"],
        help="causal and/or bidirectional attention (default: %(default)s)",
    )
    parser.add_argument("--heads", type=int, default=8, help="attention heads H (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=64, help="head dimension D (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per point, the best kept (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default="benchmarks/results",
        help="folder for attention.png and attention.md (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2],
        help="torch thread counts, one set of rows each (default: %(default)s)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (one process per point)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats, args.heads, args.dim = [256, 512], 1, 2, 16
    if "sdpa" not in args.methods:
        args.methods = ["sdpa", *args.methods]
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    results: dict[tuple, tuple[float, float]] = {}
    decode: dict[int, dict[str, float]] = {}
    memory: dict[tuple, float] = {}
    rows = []
    # --quick measures memory in this process (spawning ~4 s a process would dominate a smoke test)
    pool = None if args.quick or args.no_memory else ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
    )
    for threads in args.threads:
        with torch_threads(threads):
            decode[threads] = decode_step_times(args.heads, args.dim, steps=5 if args.quick else 50)
            for n in args.lengths:
                for direction in args.directions:
                    causal = direction == "causal"
                    for mode in args.modes:
                        methods = [m for m in args.methods if causal or m not in CAUSAL_ONLY]
                        runners = {m: _runner(m, n, mode, causal, args.heads, args.dim) for m in methods}
                        seconds = time_interleaved(runners, args.repeats, warmup=n <= 4096)
                        del runners
                        gc.collect()
                        for method in methods:
                            point = (n, direction, mode, method)
                            if point not in memory and not args.no_memory:
                                memory[point] = (
                                    _peak_in_fresh_process(method, n, mode, causal, args.heads, args.dim)
                                    if pool is None
                                    else pool.submit(
                                        _peak_in_fresh_process, method, n, mode, causal, args.heads, args.dim, threads
                                    ).result()
                                )
                            results[(threads, *point)] = (seconds[method], memory.get(point, float("nan")))
                        rows.extend(_rows(results, threads, n, direction, mode, args))
    table = format_table(
        ["threads", "N", "direction", "mode", "method", "ms", "speed-up vs sdpa", "GFLOP/s", "sdpa GFLOP/s",
         "peak MiB"],
        rows,
    )
    lines = target_lines(results, decode)
    decode_lines = [
        f"- {threads} thread(s): linear {steps['linear'] * 1e3:.3f} ms, fast-2 {steps['fast-2'] * 1e3:.3f} ms"
        for threads, steps in sorted(decode.items())
    ]
    header = (
        f"{machine_line(threads=False)}, B=1, H={args.heads}, D={args.dim}, fp32; best of {args.repeats} runs, "
        "repetitions interleaved over methods; GFLOP/s from each method's own matmul count (see "
        "`hf_fastattn/showcase/bench/attention.py`: `flops`), fwd+bwd counted as 3x the forward"
    )
    report = "\n".join([
        header, "", table, "", f"Decoding step (B=1, one token, median of {5 if args.quick else 50}):", *decode_lines, "",
        f"Targets (issue 18, N={TARGET_N}):", *lines, "", f"total run time {time.perf_counter() - started:.0f} s",
    ])
    print("\n" + report)
    command = " ".join(["hf-fastattn bench attention", *(argv or [])])
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(f"`{command}`\n\n{report}\n")
    plot(results, args.lengths, args.threads[0], os.path.join(args.out, "attention.png"))
    if pool is not None:
        pool.shutdown()
    print(f"\nwrote {args.out}/attention.md and {args.out}/attention.png")
    return 0


def _rows(results: dict, threads: int, n: int, direction: str, mode: str, args) -> list[list]:
    """Table rows of one (threads, N, direction, mode), printed as they come."""
    base = results[(threads, n, direction, mode, "sdpa")][0]
    factor = 3 if mode == "fwd+bwd" else 1
    sdpa_rate = factor * flops("sdpa", n, args.heads, args.dim, direction == "causal") / base / 1e9
    rows = []
    for method in [m for m in args.methods if (threads, n, direction, mode, m) in results]:
        seconds, mib = results[(threads, n, direction, mode, method)]
        rate = factor * flops(method, n, args.heads, args.dim, direction == "causal") / seconds / 1e9
        rows.append([threads, n, direction, mode, method, f"{seconds * 1e3:.1f}", f"{base / seconds:.2f}x",
                     "-" if rate != rate else f"{rate:.1f}", f"{sdpa_rate:.1f}", "-" if mib != mib else round(mib)])
        print(f"threads={threads} N={n:>6} {direction:>13} {mode:>8} {method:>12}: {seconds * 1e3:9.1f} ms "
              f"{base / seconds:6.2f}x sdpa {rate:6.1f} GFLOP/s (sdpa {sdpa_rate:.1f})", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
