"""`hf-fastattn bench quality`: what swapping the attention of a pretrained model costs, before any conversion.

    hf-fastattn bench quality [--model smollm2-135m] [--lengths 512 2048] [--tokens 8192] [--out DIR]

Perplexity of the model on held-out text (the last 10% of the packaged tinyshakespeare, or `--text FILE`) in
non-overlapping windows of each length, every token after the first of a window scored, the same `--tokens`
tokens for every implementation: transformers' "sdpa" (the reference), "sparse" with each pattern at its default
options, run-time "mqa" (the K/V heads mean-pooled to one group, and every other divisor of the K/V heads as
"gqa-G"), and the untrained "linear" (elu+1) and "fast" (order 2) swaps, which show why conversion is needed
(`hf-fastattn convert`). Each implementation runs on the same weights, set with `set_attn_implementation` as a
user would. Writes quality.md, quality.json and quality.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .utils import format_table, machine_line, torch_threads, with_attention

DEFAULT_MODEL = "smollm2-135m"


def variants(config) -> dict[str, tuple[str, dict]]:
    """{row name: (attn_implementation, options for `configure`)} for a model with this config."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rows = {
        "sdpa": ("sdpa", {}),
        "sparse-strided": ("sparse", {"pattern": "strided"}),
        "sparse-fixed": ("sparse", {"pattern": "fixed"}),
        "mqa": ("mqa", {"kv_groups": 1}),
    }
    for groups in range(2, kv_heads):
        if kv_heads % groups == 0:
            rows[f"gqa-{groups}"] = ("mqa", {"kv_groups": groups})
    rows["linear (untrained)"] = ("linear", {})
    rows["fast (untrained)"] = ("fast", {})
    return rows


def held_out_ids(tokenizer, text_file: str | None, tokens: int) -> torch.Tensor:
    """The first `tokens` ids of the held-out text (the last 10% of tinyshakespeare, or all of `text_file`)."""
    from ..tinylm import load_corpus, split_corpus

    text = load_corpus(text_file) if text_file else split_corpus(load_corpus())[1]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < tokens:
        raise ValueError(f"--tokens {tokens}: the held-out text has only {len(ids)} tokens")
    return ids[:tokens]


def plot(rows: list[dict], lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(lengths)
    for i, length in enumerate(lengths):
        ratios = [next(r["x_sdpa"] for r in rows if r["variant"] == n and r["length"] == length) for n in names]
        bars = ax.bar([j + i * width for j in range(len(names))], ratios, width, label=f"{length} tokens")
        ax.bar_label(bars, [f"{x:.3g}" for x in ratios], fontsize=7)
    ax.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(ylabel="perplexity / sdpa's (log)", title="attention swapped into the pretrained model, no training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fastattn bench quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="causal LM: short name, .gguf file, local folder or Hub id (default: %(default)s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048],
                        help="window lengths in tokens (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=8192,
                        help="held-out tokens scored per length and implementation (default: %(default)s)")
    parser.add_argument("--text", default=None,
                        help="held-out text file (default: the last 10%% of the packaged tinyshakespeare)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default="benchmarks/results/real", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag, value in (("--tokens", args.tokens), ("--batch-size", args.batch_size), *(("--lengths", n) for n in args.lengths)):
        if value < 2:
            parser.error(f"{flag} must be at least 2, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    from ...conversion.distill import perplexity_of_ids
    from ...loading import load_causal_lm

    start = time.perf_counter()
    with torch_threads(args.threads):
        base, tokenizer = load_causal_lm(args.model, flag="--model")
        ids = held_out_ids(tokenizer, args.text, args.tokens)
        rows = []
        for name, (implementation, options) in variants(base.config).items():
            model = with_attention(base, implementation, **options)
            for length in args.lengths:
                began = time.perf_counter()
                ppl = perplexity_of_ids(model, ids, length, args.batch_size)
                rows.append({"variant": name, "length": length, "ppl": ppl, "seconds": time.perf_counter() - began})
                print(f"{name:>20} @ {length}: ppl {ppl:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
            del model
        machine = machine_line()
    reference = {r["length"]: r["ppl"] for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        r["x_sdpa"] = r["ppl"] / reference[r["length"]]
    header = ["variant", *(f"ppl @{n}" for n in args.lengths), *(f"x sdpa @{n}" for n in args.lengths)]
    table = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = {r["length"]: r for r in rows if r["variant"] == name}
        table.append([name, *(f"{mine[n]['ppl']:.2f}" for n in args.lengths),
                      *(f"{mine[n]['x_sdpa']:.3f}" for n in args.lengths)])
    text = format_table(header, table)
    footer = (
        f"\n\n{args.model} ({base.config.num_hidden_layers} layers, {base.config.num_attention_heads} heads, "
        f"{base.config.num_key_value_heads} K/V heads), {args.tokens} held-out tokens per length, fp32; "
        f"{machine}; {time.perf_counter() - start:.0f} s\n"
    )
    print("\n" + text + footer)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text + footer)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"model": args.model, "tokens": args.tokens, "machine": machine, "rows": rows}, f, indent=1)
    plot(rows, args.lengths, os.path.join(args.out, "quality.png"))
    return 0
