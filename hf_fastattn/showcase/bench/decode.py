"""`hf-fastattn bench decode`: per-token decode latency and cache bytes against the context length.

    hf-fastattn bench decode [--contexts 1024 4096 16384 32768] [--steps 20] [--threads 1] [--out DIR] [--quick]
    hf-fastattn bench decode --model smollm2-135m --out benchmarks/results/real   # a real pretrained architecture

A Llama-shaped model (8 layers, hidden 512, 8 heads of 64, intermediate 1376, vocab 32000, random weights, fp32)
with "linear", "fast" (order 2) and the sliding-window "hybrid" attention decoding on a `RecurrentCache`, against "sdpa" decoding on
transformers' `DynamicCache`, all in one run with the same weights. For each context N, each implementation is
brought to a cache holding N tokens (all caches are kept), then single-token forwards
`model(token, cache=..., position_ids=[[N]])` are timed (no_grad, use_cache=True): `--warmup` untimed and
`--steps` timed rounds, each round one step of every implementation at every context, so that load from other
processes on a shared machine hits all of them alike; the median is reported. Every timed step starts from the
same N-token cache:

- sdpa: the DynamicCache is filled with random K/V tensors of N tokens per layer (what a K/V cache holds after N
  tokens, cost-wise: a real O(N^2) prefill of 32K tokens would take long and change nothing in the step). After each
  step it is cropped back to N tokens (outside the timer). The step includes DynamicCache's `torch.cat` of the new
  token onto the cache, which copies the whole K/V cache: that is what transformers' default cache costs.
- sdpa-static: the same on a `StaticCache` of N + 1 slots (preallocated, written in place: no copy), the fairer
  baseline for the attention itself.
- linear: N real tokens (random ids) are prefilled through the model (chunked form, pieces of `--prefill-piece`
  tokens, each context continuing from the previous one).
- fast: the same (FAST order 2 prefills at ~2.5 ms/token on one thread of this CPU, ~1.5 min for 32K). With
  `--fast-prefill-limit L` only L tokens are prefilled for real; longer contexts keep the state of that prefix and
  the layers' token counts are set to N, so positions (RoPE) and masks are those of context N (a one-token
  recurrent step costs the same whatever the state's values and count). --quick does this beyond 64 tokens.
- hybrid: "linear" with the LoLCATs sliding window (`window=64`: softmax over the last 64 tokens, elu+1 linear
  attention beyond, and the default 4 attention sinks), as hedgehog / t2r conversions with `hybrid=True` run; its
  RecurrentCache holds the linear state plus the last 64 keys and values and the 4 sinks'. Prefilled for real like
  linear.
- linear, fast, hybrid: each timed step runs on a deep copy of the N-token RecurrentCache made outside the timer.
- no-attention: the same model with an attention function that returns zeros, timed in the same rounds beside
  each context (it reads no K/V; its cache holds only the step's token). The rest of the model costs that much per
  token whatever the attention, so it bounds what any attention can gain; the report prints the bound and each
  recurrent implementation's own cost above it.

Timings use one torch thread by default (`--threads`): batch-1 decode is memory-bound, and on a shared CPU
multi-threaded kernels stall on descheduled threads.

With `--model` (a short name, .gguf file, folder or Hub id) the same runs on that pretrained model instead, each
implementation set on a copy with `set_attn_implementation`; the recurrent caches then prefill at most
`--prefill-limit` real tokens (default 2048 with --model) and set the count to N beyond, as described for fast.
The table marks the crossover: the context from which each recurrent implementation's step is faster than each
K/V cache's (interpolated between the measured contexts).

Cache bytes: `RecurrentCache.nbytes()`; for the DynamicCache the bytes of its K and V tensors. Prints a markdown
table and whether the targets of issue 3 are met (reported, never asserted), and writes decode.md, decode.json and
decode.png under --out (quick_decode.* with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import textwrap
import time

import torch

from ...integration.cache import RecurrentCache, cache_argument
from .utils import cache_nbytes, crossover, describe_crossover, format_table, machine_line, torch_threads

IMPLEMENTATIONS = ("sdpa", "sdpa-static", "linear", "fast", "hybrid")
KV_CACHES = ("sdpa", "sdpa-static")  # sdpa on transformers' DynamicCache (generate's default) / a StaticCache
RECURRENT = ("linear", "fast", "hybrid")
# the same model with an attention function that returns zeros, timed in the same rounds: the floor of any
# attention's step (the rest of the model: projections, MLPs, norms, LM head), so the most any attention can gain
FLOOR = "no-attention"
HYBRID_WINDOW = 64  # "hybrid": "linear" with the LoLCATs sliding window (softmax over the last 64 tokens)
# issue 3's targets
FLAT_RATIO = 1.2  # linear latency at the longest context / at the shortest
MIN_SPEEDUP = 10.0  # linear vs sdpa at the longest context

FULL_SHAPE = dict(layers=8, hidden=512, heads=8, intermediate=1376, vocab=32000)
QUICK_SHAPE = dict(layers=2, hidden=64, heads=4, intermediate=128, vocab=256)


def build_model(implementation: str, shape: dict, max_positions: int, pretrained=None):
    """A randomly initialized Llama with `implementation` attention ("hybrid": "linear" with the sliding-window
    option); the same weights for every implementation. With `pretrained`, a copy of that model instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if implementation == "hybrid":
        from ...integration.registry import configure

        model = build_model("linear", shape, max_positions, pretrained)
        configure(model, window=HYBRID_WINDOW)
        return model
    if pretrained is not None:
        model = copy.deepcopy(pretrained)
        model.set_attn_implementation(implementation)
        return model.eval()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=max_positions,
        attn_implementation=implementation,
    )
    return LlamaForCausalLM(config).eval()


def _zeros_attention(module, query, key, value, attention_mask, **kwargs):
    """The `FLOOR` model's attention: no attention at all (zeros in the layout attention functions return)."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def floor_model(model):
    """A copy of `model` whose attention returns zeros (registered with transformers as "hf_fastattn_bench_zeros")."""
    from transformers import AttentionInterface

    AttentionInterface.register("hf_fastattn_bench_zeros", _zeros_attention)
    floor = copy.deepcopy(model)
    floor.set_attn_implementation("hf_fastattn_bench_zeros")
    return floor.eval()


def random_kv_cache(model, n: int, generator: torch.Generator, static: bool = False):
    """A DynamicCache (or a StaticCache of n + 1 slots) holding random K/V of `n` tokens in every layer
    (`[1, Hkv, n, D]` each)."""
    from transformers.cache_utils import DynamicCache, StaticCache

    config = model.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = StaticCache(config=config, max_cache_len=n + 1) if static else DynamicCache(config=config)
    for layer_idx in range(config.num_hidden_layers):
        k, v = (torch.randn(1, heads, n, head_dim, generator=generator) for _ in range(2))
        cache.update(k, v, layer_idx)
    return cache


class RecurrentContext:
    """A RecurrentCache brought to growing contexts by real prefill, up to `limit` real tokens (None: all), its last
    token fed as a one-token step (so the hybrid's cache holds its sinks and window as decoding keeps them)."""

    def __init__(self, model, piece: int, limit: int | None, generator: torch.Generator):
        self.model, self.piece, self.limit, self.generator = model, piece, limit, generator
        self.cache = RecurrentCache(model)
        self.real = 0  # tokens actually prefilled
        self.name = cache_argument(model)

    def advance(self, n: int) -> tuple[RecurrentCache, int]:
        """(a cache at context `n`, real tokens in its state). Contexts must not decrease."""
        target = n if self.limit is None else min(n, self.limit)
        while self.real < target:
            length = min(self.piece, target - self.real)
            if 1 < length == target - self.real:
                length -= 1  # the last token alone: the cache as generate leaves it after a decoding step
            ids = torch.randint(0, self.model.config.vocab_size, (1, length), generator=self.generator)
            positions = torch.arange(self.real, self.real + length)[None]
            self.model(ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{self.name: self.cache})
            self.real += length
        if self.real != self.cache.get_seq_length():
            raise RuntimeError(f"RecurrentCache counts {self.cache.get_seq_length()} tokens, {self.real} were prefilled")
        cache = copy.deepcopy(self.cache)
        for layer in cache.layers:
            # beyond the real prefix: the state of the prefix at context n (a step's cost does not depend on either)
            layer.seen_tokens = n
        return cache, self.real


def time_step(model, token: torch.Tensor, n: int, cache) -> float:
    """Seconds of one single-token forward at position `n` on `cache` (which it updates)."""
    kwargs = {cache_argument(model): cache}
    start = time.perf_counter()
    model(token, position_ids=torch.tensor([[n]]), use_cache=True, **kwargs)
    return time.perf_counter() - start


def measure(models: dict, caches: dict, token: torch.Tensor, warmup: int, steps: int) -> dict:
    """Step times (seconds) per (implementation, context): `warmup` untimed then `steps` timed rounds, each round one
    step of every implementation at every context (so load from other processes hits all of them alike)."""
    times = {key: [] for key in caches}
    for i in range(warmup + steps):
        for (impl, n), base in caches.items():
            model = models[impl]
            if isinstance(base, RecurrentCache):
                cache = copy.deepcopy(base)
                seconds = time_step(model, token, n, cache)
                if cache.get_seq_length() != n + 1:
                    raise RuntimeError(f"{impl}: the cache counts {cache.get_seq_length()} tokens after a step at {n}")
                del cache
            else:
                seconds = time_step(model, token, n, base)
                keep = 0 if impl == FLOOR else n
                base.crop(-(base.get_seq_length() - keep))  # back to n tokens (the floor's cache: back to none)
            if i >= warmup:
                times[impl, n].append(seconds)
        if i == warmup - 1 or (i >= warmup and (i - warmup + 1) % 5 == 0):
            print(f"round {i + 1}/{warmup + steps} done", flush=True)
    return times


def plot(results: dict, contexts: list[int], path: str, title: str, floor: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"sdpa": "-o", "sdpa-static": "--s", "linear": "-^", "fast": "-D", "hybrid": "-v"}
    for impl in results:
        style = styles.get(impl, "-x")
        ms = [results[impl][n]["ms"] for n in contexts]
        spread = [[m - results[impl][n]["p25_ms"] for m, n in zip(ms, contexts)],
                  [results[impl][n]["p75_ms"] - m for m, n in zip(ms, contexts)]]
        axes[0].errorbar(contexts, ms, yerr=spread, fmt=style, capsize=3, label=impl)
        axes[1].plot(contexts, [results[impl][n]["cache_bytes"] / 2**20 for n in contexts], style, label=impl)
    if floor:
        axes[0].plot(contexts, [floor[n] for n in contexts], ":", color="gray", label=f"{FLOOR} (floor)")
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="ms / token")
    axes[0].set_title("decode latency (median, bars: quartiles)")
    axes[0].set_ylim(bottom=0)
    axes[1].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB", title="cache size")
    for ax in axes:
        ax.set_xticks(contexts, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in contexts])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_targets(results: dict, contexts: list[int]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for issue 3's targets."""
    lo, hi = contexts[0], contexts[-1]
    checks = []
    if "linear" in results:
        ratio = results["linear"][hi]["ms"] / results["linear"][lo]["ms"]
        checks.append((f"linear latency flat: {hi}/{lo} ratio <= {FLAT_RATIO}", ratio <= FLAT_RATIO, f"{ratio:.2f}"))
        for base, note in (("sdpa", ""), ("sdpa-static", " (stricter than the issue's: preallocated K/V)")):
            if base in results:
                speedup = results[base][hi]["ms"] / results["linear"][hi]["ms"]
                target = f"linear >= {MIN_SPEEDUP:g}x faster than {base} at {hi}{note}"
                checks.append((target, speedup >= MIN_SPEEDUP, f"{speedup:.1f}x"))
    for impl in RECURRENT:
        if impl in results:
            sizes = {results[impl][n]["cache_bytes"] for n in contexts}
            measured = ", ".join(f"{results[impl][n]['cache_bytes']:,}" for n in contexts)
            checks.append((f"{impl} cache bytes constant in context", len(sizes) == 1, measured))
    return checks


def context_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fastattn bench decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
        help="context lengths in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
        help="attention implementations (and caches) to compare (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed single-token forwards per context and method (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards before them (default: %(default)s)")
    parser.add_argument("--prefill-piece", type=int, default=4096, help="tokens per prefill forward (default: %(default)s)")
    parser.add_argument(
        "--fast-prefill-limit",
        type=int,
        default=0,
        help="at most this many real prefill tokens for 'fast' (0: no limit); longer contexts reuse that state with "
        "the token count set to N (a recurrent step costs the same) (default: %(default)s)",
    )
    parser.add_argument(
        "--model", default=None,
        help="a pretrained causal LM (short name such as smollm2-135m, .gguf file, folder or Hub id) instead of the "
        "random-weight Llama (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-limit", type=int, default=None,
        help="at most this many real prefill tokens for every recurrent implementation; longer contexts reuse that "
        "state with the count set to N (default: %(default)s, i.e. no limit; 2048 with --model)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). One by default: on a shared CPU, multi-threaded kernels stall on "
        "descheduled threads and single-token timings become noise (an sdpa call of 12 us took 16 ms with 2 threads)"
        " (default: %(default)s)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for decode.md, decode.json, decode.png (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model (2 layers, hidden 64), contexts 64 and 256, 3 steps"
    )
    args = parser.parse_args(argv)
    if args.prefill_limit is not None and args.prefill_limit < 1:
        parser.error(f"--prefill-limit must be at least 1, got {args.prefill_limit}")
    if args.model and args.quick:
        parser.error("--quick runs the tiny random model; it cannot be combined with --model")
    if args.model and args.prefill_limit is None:
        args.prefill_limit = 2048
    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    if args.quick:
        args.contexts, args.steps, args.warmup, args.prefill_piece, args.fast_prefill_limit = [64, 256], 3, 1, 128, 64
    contexts = sorted(set(args.contexts))
    with torch_threads(args.threads):
        return _run(args, argv, shape, contexts)


def _run(args, argv, shape: dict, contexts: list[int]) -> int:
    fast_limit = args.fast_prefill_limit or None
    started = time.perf_counter()

    max_positions = contexts[-1] + args.warmup + args.steps + 1024
    pretrained = None
    if args.model:
        from ...loading import load_causal_lm

        pretrained = load_causal_lm(args.model, flag="--model")[0].eval()
    models = {}
    for impl in args.implementations:
        attention = "sdpa" if impl in KV_CACHES else impl
        # sdpa and sdpa-static share one model (the same weights anyway: every model is built from seed 0)
        models[impl] = next((m for k, m in models.items() if k in KV_CACHES), None) if attention == "sdpa" else None
        if models[impl] is None:
            models[impl] = build_model(attention, shape, max_positions, pretrained)
    kv_model = next((models[k] for k in KV_CACHES if k in models), None)
    models[FLOOR] = floor_model(kv_model if kv_model is not None else build_model("sdpa", shape, max_positions, pretrained))
    generator = torch.Generator().manual_seed(0)
    limits = {impl: min(filter(None, (args.prefill_limit, fast_limit if impl == "fast" else None)), default=None)
              for impl in RECURRENT}
    prefill = {
        impl: RecurrentContext(models[impl], args.prefill_piece, limits[impl], generator)
        for impl in args.implementations
        if impl in RECURRENT
    }
    token = torch.tensor([[7]])
    from transformers.cache_utils import DynamicCache

    caches, real = {}, {}
    for n in contexts:
        for impl in args.implementations:
            t0 = time.perf_counter()
            if impl in RECURRENT:
                caches[impl, n], real[impl, n] = prefill[impl].advance(n)
                how = f"{real[impl, n]} real tokens prefilled" + (f", count set to {n}" if real[impl, n] < n else "")
            else:
                static = impl == "sdpa-static"
                caches[impl, n], real[impl, n] = random_kv_cache(models[impl], n, generator, static=static), 0
                how = f"random K/V of {n} tokens in a {'StaticCache' if static else 'DynamicCache'}"
            print(f"context {n}: {impl} ready in {time.perf_counter() - t0:.1f} s ({how})", flush=True)
        # no K/V is read, so its cost is context-free; timed in each context's turn all the same, so that each of its
        # steps, like every other, follows another model's step (back to back, a step of the same model runs ~15%
        # faster on SmolLM2: its weights are still warm)
        caches[FLOOR, n] = DynamicCache(config=models[FLOOR].config)
    del prefill
    sizes = {key: cache_nbytes(cache) for key, cache in caches.items()}
    times = measure(models, caches, token, args.warmup, args.steps)
    del caches
    floor = {n: statistics.median(t * 1e3 for t in times.pop((FLOOR, n))) for n in contexts}
    results = {impl: {} for impl in args.implementations}
    for (impl, n), seconds in times.items():
        ms = sorted(t * 1e3 for t in seconds)
        results[impl][n] = {
            "ms": statistics.median(ms),
            "p25_ms": ms[len(ms) // 4],
            "p75_ms": ms[(3 * len(ms)) // 4],
            "step_ms": [t * 1e3 for t in seconds],
            "cache_bytes": sizes[impl, n],
            "real_prefill_tokens": real[impl, n],
        }
    results = {impl: dict(sorted(per.items())) for impl, per in results.items()}

    bases = [b for b in KV_CACHES if b in results]
    speedups = [(impl, base) for base in bases for impl in args.implementations if impl in RECURRENT]
    rows = []
    for n in contexts:
        row = [context_label(n)]
        for ms in (*(results[impl][n]["ms"] for impl in args.implementations), floor[n]):
            row.append(f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")
        for impl, base in speedups:
            row.append(f"{results[base][n]['ms'] / results[impl][n]['ms']:.1f}x")
        for impl in args.implementations:
            row.append(f"{results[impl][n]['cache_bytes'] / 2**20:.2f}")
        rows.append(row)
    header = [
        "context",
        *(f"{impl} ms/token" for impl in args.implementations),
        f"{FLOOR} ms/token",
        *(f"{impl} speed-up vs {base}" for impl, base in speedups),
        *(f"{impl} cache MiB" for impl in args.implementations),
    ]
    table = format_table(header, rows)
    checks = check_targets(results, contexts)
    lines = [f"- {'met' if met else 'NOT met'}: {target} (measured {value})" for target, met, value in checks]
    if "linear" in results:
        ratio = results["linear"][contexts[-1]]["ms"] / results["linear"][contexts[0]]["ms"]
        lines.insert(0, f"- linear latency({context_label(contexts[-1])}) / latency({context_label(contexts[0])}) = "
                        f"{ratio:.2f}")
    hi = contexts[-1]
    floor_line = (f"- the same model with no attention at all (its attention returns zeros): {floor[hi]:.1f} ms/token "
                  f"at {context_label(hi)} ({min(floor.values()):.1f}-{max(floor.values()):.1f} over the contexts)")
    if "sdpa" in results:
        floor_line += (f"; so no attention can be more than {results['sdpa'][hi]['ms'] / floor[hi]:.1f}x faster "
                       f"than sdpa on the DynamicCache at {context_label(hi)}")
    extra = [f"{impl} {results[impl][hi]['ms'] - floor[hi]:.1f}" for impl in args.implementations if impl in RECURRENT]
    if extra:
        floor_line += f"; attention's own cost per token at {context_label(hi)} (ms): " + ", ".join(extra)
    lines.insert(0, floor_line)
    if pretrained is not None:
        config = pretrained.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        model_line = (
            f"{args.model} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} K/V heads of {head_dim}, vocab "
            f"{config.vocab_size}, pretrained weights), fp32, batch 1"
        )
    else:
        model_line = (
            f"Llama, {shape['layers']} layers, hidden {shape['hidden']}, {shape['heads']} heads of "
            f"{shape['hidden'] // shape['heads']}, intermediate {shape['intermediate']}, vocab {shape['vocab']}, random "
            f"weights, fp32, batch 1"
        )
    model_line += (
        f"; fast = order 2; median of {args.steps} steps after {args.warmup} warm-up, "
        f"interleaved over implementations and contexts; {machine_line()}"
    )
    records = [{"model": impl, "context": n, "ms": results[impl][n]["ms"]} for impl in results for n in contexts]
    crossings = {
        f"{impl} vs {base}": crossover(records, impl, base, "ms") for impl in results if impl in RECURRENT
        for base in bases
    }
    crossing_lines = [f"- {pair}: faster per token {describe_crossover(c)}" for pair, c in crossings.items()]
    notes = [
        "How each context was reached:",
        "- sdpa: transformers' DynamicCache (generate's default) filled with random K/V of N tokens per layer, "
        "cropped back to N after each step; the step includes the cache's torch.cat, a copy of the whole K/V.",
        "- sdpa-static: a StaticCache of N + 1 slots filled the same way, cropped back after each step (no copy; the "
        "mask covers the N + 1 slots).",
    ]
    for impl in RECURRENT:
        if impl not in results:
            continue
        real_tokens = {n: results[impl][n]["real_prefill_tokens"] for n in contexts}
        if all(real_tokens[n] == n for n in contexts):
            notes.append(f"- {impl}: N random-id tokens prefilled for real (pieces of {args.prefill_piece}).")
        else:
            notes.append(
                f"- {impl}: real prefill of min(N, {limits[impl]}) tokens; for longer contexts the state of that prefix "
                "is kept and the token count set to N (positions and masks of context N; a recurrent step costs the "
                "same whatever the state holds)."
            )
    if "hybrid" in results:
        notes.append(f"- hybrid: linear with the sliding-window option (window {HYBRID_WINDOW}); its cache holds the "
                     "state and the last window keys and values.")
    notes.append("- linear, fast, hybrid: each timed step runs on a deep copy of the N-token RecurrentCache (made untimed).")
    elapsed = time.perf_counter() - started
    command = "hf-fastattn bench decode " + " ".join(argv or [])
    report = "\n".join(
        [f"`{command.strip()}`", "", model_line, "", table, "", "Crossover (interpolated between measured contexts):",
         *crossing_lines, "", "Targets (issue 3):", *lines, "", *notes,
         "", f"total run time {elapsed:.0f} s"]
    )
    print()
    print(report)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "quick_decode" if args.quick else "decode")
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "command": command.strip(),
                "args": vars(args),
                "model": args.model or shape,
                "crossovers": crossings,
                "no_attention_ms": {str(n): ms for n, ms in floor.items()},
                "machine": machine_line(),
                "results": {impl: {str(n): r for n, r in per.items()} for impl, per in results.items()},
                "targets": [{"target": t, "met": m, "measured": v} for t, m, v in checks],
                "seconds": elapsed,
            },
            f,
            indent=1,
        )
    plot(results, contexts, stem + ".png", model_line, floor)
    print(f"\nwrote {stem}.md, .json, .png")
    return 0
