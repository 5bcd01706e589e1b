"""`hf-fastattn bench kernels`: the Triton kernels against SDPA / FlashAttention and, where installed, fla.

For users with a GPU: causal forward and forward+backward, B=1, H=16, D=64, bf16, N from 1K to 64K, for

    sdpa          torch.nn.functional.scaled_dot_product_attention (FlashAttention-2 backend on recent GPUs)
    flash_attn    flash_attn.flash_attn_func, if the flash-attn package is installed
    fla_linear    fla.ops.linear_attn.chunk_linear_attn (elu+1 features, normalized), if fla is installed
    linear        hf_fastattn linear attention (elu+1), Triton chunk kernel
    linear-torch  the same operator's PyTorch form (chunked matmuls), what backend="auto" would otherwise run
    fast-1/fast-2 hf_fastattn FAST fastmax order 1 / 2, Triton
    sparse        hf_fastattn block-sparse strided pattern (stride 128), Triton

all in one run, so ratios are measured side by side. Prints a markdown table, writes a PNG plot and a JSON.

`--quick` runs the same code path on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1) with tiny sizes: a
smoke test that the benchmark and the kernels run, not a measurement.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .utils import format_table, machine_line


def _methods(device: str) -> dict:
    from ...ops import fast_attention, linear_attention, sparse_attention

    methods = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="triton"),
        # the same operator's PyTorch form (chunked matmuls): whether the Triton kernel beats our own fallback
        "linear-torch": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="torch"),
        "fast-1": lambda q, k, v: fast_attention(q, k, v, causal=True, order=1, backend="triton"),
        "fast-2": lambda q, k, v: fast_attention(q, k, v, causal=True, order=2, backend="triton"),
        "sparse": lambda q, k, v: sparse_attention(
            q, k, v, causal=True, pattern="strided", stride=128, backend="triton"
        ),
    }
    if device == "cuda":
        try:
            from flash_attn import flash_attn_func

            # flash-attn takes [B, N, H, D]
            methods["flash_attn"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            ).transpose(1, 2)
        except ImportError:
            pass
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            # fla takes [B, N, H, D] (older releases needed head_first=False to say so)
            layout = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

            def fla_linear(q, k, v):
                phi_q, phi_k = (F.elu(x.transpose(1, 2)) + 1 for x in (q, k))
                out, _ = chunk_linear_attn(phi_q, phi_k, v.transpose(1, 2), scale=1.0, normalize=True, **layout)
                return out.transpose(1, 2)

            methods["fla_linear"] = fla_linear
        except ImportError:
            pass
    return methods


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3

    def cpu_time(fn):
        fn()  # warm-up (compiles / decorates the kernels)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_time


def measure(name: str, fn, n: int, mode: str, *, heads: int, dim: int, dtype, device: str, timer) -> float | None:
    """Seconds per call (mode "fwd") or call + backward ("fwd+bwd"); None when out of memory."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))

    def run():
        if grad:
            fn(q, k, v).float().sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v)

    try:
        return timer(run)
    except torch.OutOfMemoryError:
        return None


def plot(results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name, by_mode in results.items():
            points = [(n, t * 1e3) for n, t in zip(lengths, by_mode[mode]) if t is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms", title=f"causal {mode}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="sequence lengths N (default: %(default)s)"
    )
    parser.add_argument("--heads", type=int, default=16, help="attention heads H (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D (default: %(default)s)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="input dtype (default: %(default)s)"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all available)")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for kernels.md, kernels.json, kernels.png (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="CPU, Triton interpreter, tiny sizes (smoke test)")
    args = parser.parse_args(argv)

    if args.quick:
        from ...kernels.dispatch import interpreter_enabled, interpreter_ready

        if not (interpreter_enabled() and interpreter_ready()):
            parser.error("--quick runs in Triton's interpreter: start it as `TRITON_INTERPRET=1 hf-fastattn bench kernels --quick`")
        args.lengths, args.heads, args.head_dim, args.dtype = [16, 48], 2, 16, "float32"
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("the kernel benchmark needs a CUDA GPU; use --quick for the CPU interpreter smoke test")
    dtype = getattr(torch, args.dtype)
    methods = _methods(device)
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            parser.error(f"unknown or unavailable methods {unknown}; available here: {sorted(methods)}")
        methods = {name: methods[name] for name in args.methods}
    timer = _timer(device)

    results = {name: {"fwd": [], "fwd+bwd": []} for name in methods}
    for n in args.lengths:
        for name, fn in methods.items():
            for mode in ("fwd", "fwd+bwd"):
                results[name][mode].append(
                    measure(name, fn, n, mode, heads=args.heads, dim=args.head_dim, dtype=dtype, device=device, timer=timer)
                )
                if device == "cuda":
                    torch.cuda.empty_cache()  # the inputs of `measure` are gone: give their memory back before N grows
            # progress as measured (the first call of a kernel compiles it; fla autotunes): a run cut short by a time
            # limit still shows what it measured
            fwd, both = results[name]["fwd"][-1], results[name]["fwd+bwd"][-1]
            print(f"N={n} {name}: fwd {_ms(fwd)} ms, fwd+bwd {_ms(both)} ms", flush=True)

    rows = []
    for i, n in enumerate(args.lengths):
        for name in methods:
            fwd, both = results[name]["fwd"][i], results[name]["fwd+bwd"][i]
            base = results["sdpa"]["fwd"][i] if "sdpa" in results else None
            speedup = base / fwd if base and fwd else None
            rows.append([n, name, _ms(fwd), _ms(both), "-" if speedup is None else f"{speedup:.2f}x"])
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: not a measurement)"
    title = f"Causal attention kernels, B=1, H={args.heads}, D={args.head_dim}, {args.dtype}, {device_name}; {machine_line()}"
    table = format_table(["N", "method", "fwd ms", "fwd+bwd ms", "fwd vs sdpa"], rows)
    print(title)
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(f"{title}\n\n{table}\n")
    (out / "kernels.json").write_text(
        json.dumps({"lengths": args.lengths, "device": device_name, "dtype": args.dtype, "results": results}, indent=1)
    )
    plot(results, args.lengths, out / "kernels.png")
    print(f"wrote {out / 'kernels.md'}, {out / 'kernels.png'}, {out / 'kernels.json'}")
    return 0


def _ms(seconds: float | None) -> str:
    return "OOM" if seconds is None else f"{seconds * 1e3:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
