"""Jacobi decoding against greedy `generate` on held-out tinyshakespeare prompts (wall-clock, forward passes).

    hf-fastattn bench jacobi [--prompts 50] [--new-tokens 128] [--modes ...] [--threads 1] [--out benchmarks/results]

The model is `hf_fastattn.tinylm.get_tiny_llama()` (a small Llama trained on tinyshakespeare, cached after the first
run). Prompts are windows of the validation split. The baseline is plain `model.generate(do_sample=False)` (its
default DynamicCache); every mode's output is asserted identical to it. Each (prompt, method) pair is timed
`--repeats` times, interleaved (so load changes on a shared machine hit every method alike), best time kept, all on
`--threads` torch threads. Prints a markdown table and writes jacobi.md, jacobi.json and jacobi.png under --out.

A reference row, "no_guess_loop", runs our decoding loop with no guesses at all (plain greedy steps,
`mode="hybrid", max_iterations=0`): the part of a mode's speed-up that comes from the loop itself rather than from
accepted guesses.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ..generation.jacobi import MODES, jacobi_decoding
from .utils import format_table, machine_line, torch_threads


def load_model(quick: bool):
    """The trained tiny Llama and its held-out text; with `quick`, a random tiny model on random text (offline)."""
    if quick:
        from ..conversion.tiny import tiny_llama

        torch.manual_seed(0)
        model = tiny_llama(vocab_size=128, hidden_size=32, layers=2, heads=2).eval()
        return model, None, torch.randint(3, 128, (4000,))
    from ..tinylm import get_tiny_llama, load_corpus, split_corpus

    model, tokenizer = get_tiny_llama()
    _, val = split_corpus(load_corpus())
    return model.eval(), tokenizer, torch.tensor(tokenizer(val, add_special_tokens=False)["input_ids"])


def make_prompts(tokens: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` windows of `length` tokens spread evenly over the held-out token stream, each `[1, length]`."""
    starts = torch.linspace(0, len(tokens) - length - 1, count).long().tolist()
    return [tokens[s : s + length][None] for s in starts]


REFERENCE = "no_guess_loop"  # our loop making no guesses: plain greedy steps


def run_one(model, prompt, method: str, new_tokens: int, block_size: int | None):
    """(seconds, output ids, forward passes) of one generation; greedy's forwards are one per new token.

    `method` is "greedy" (`generate`), a Jacobi mode, or "no_guess_loop"."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if method == REFERENCE:
        method, kwargs["max_iterations"] = "hybrid", 0
    start = time.perf_counter()
    if method == "greedy":
        out = model.generate(prompt, **kwargs)
        passes = out.shape[1] - prompt.shape[1]
    else:
        res = model.generate(
            prompt,
            custom_generate=jacobi_decoding,
            mode=method,
            block_size=block_size,
            return_dict_in_generate=True,
            **kwargs,
        )
        out, passes = res.sequences, res.num_forward_passes
    return time.perf_counter() - start, out, passes


def time_methods(
    model, prompt, methods: list[str], new_tokens: int, block_size: int | None, repeats: int, label: str = ""
):
    """({method: best seconds}, {method: (output ids, forward passes)}) over `repeats` interleaved rounds of runs of
    every method (one of them "greedy") on one prompt. Raises AssertionError if an output differs from greedy's."""
    best = {m: float("inf") for m in methods}
    outputs = {}
    for r in range(repeats):
        # interleaved, so load changes on a shared machine hit every method alike; the order rotates every round
        for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
            seconds, out, passes = run_one(model, prompt, method, new_tokens, block_size)
            best[method] = min(best[method], seconds)
            outputs[method] = (out, passes)
    prefix = f"{label}: " if label else ""
    for method in methods:
        if not torch.equal(outputs[method][0], outputs["greedy"][0]):
            raise AssertionError(f"{prefix}{method} output differs from greedy generate")
    return best, outputs


def plot(results: dict, methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in methods if m != "greedy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    speedups = [
        [g / t for g, t in zip(results["greedy"]["time"], results[m]["time"], strict=True)] for m in modes
    ]
    axes[0].boxplot(speedups, tick_labels=modes)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].axhline(0.9, color="red", lw=0.8, ls="--", label="0.9x")
    axes[0].axhline(1.38, color="green", lw=0.8, ls="--", label="1.38x")
    axes[0].set_ylabel("speed-up over greedy generate (per prompt)")
    axes[0].legend()
    per_token = [sum(results[m]["passes"]) / sum(results[m]["tokens"]) for m in methods]
    axes[1].bar(methods, per_token, color=["gray"] + ["C0"] * len(modes))
    axes[1].set_ylabel("forward passes per new token")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("Jacobi decoding vs greedy, tiny Llama on tinyshakespeare (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn bench jacobi", description=__doc__)
    parser.add_argument("--prompts", type=int, default=50, help="prompts from the validation split (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default: %(default)s)")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=list(MODES), help="Jacobi modes to time (default: %(default)s)"
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="guesses per pass (default: each mode's)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per (prompt, method); best is kept (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for every method (1: steadier on a shared CPU) (default: %(default)s)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help=f"skip the {REFERENCE!r} row (our loop, no guesses)"
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the report and plot (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="random tiny model, 2 prompts, 12 tokens (smoke test)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats, args.prompt_tokens = 2, 12, 1, 12

    with torch_threads(args.threads):
        return _run(args, argv)


def _run(args, argv) -> int:
    model, _, tokens = load_model(args.quick)
    prompts = make_prompts(tokens, args.prompts, args.prompt_tokens)
    methods = ["greedy", *args.modes, *([] if args.no_reference else [REFERENCE])]
    results = {m: {"time": [], "passes": [], "tokens": []} for m in methods}
    for method in methods:  # warm-up
        run_one(model, prompts[0], method, 8, args.block_size)

    for i, prompt in enumerate(prompts):
        best, outputs = time_methods(
            model, prompt, methods, args.new_tokens, args.block_size, args.repeats, label=f"prompt {i}"
        )
        for method in methods:
            out, passes = outputs[method]
            results[method]["time"].append(best[method])
            results[method]["passes"].append(passes)
            results[method]["tokens"].append(out.shape[1] - prompt.shape[1])
        speed = "  ".join(f"{m} {best['greedy'] / best[m]:.2f}x" for m in methods[1:])
        print(f"prompt {i + 1}/{len(prompts)}: {speed}", flush=True)

    greedy_time = results["greedy"]["time"]
    rows = []
    for method in methods:
        r = results[method]
        per_prompt = [g / t for g, t in zip(greedy_time, r["time"], strict=True)]
        rows.append(
            [
                method,
                sum(r["passes"]) / sum(r["tokens"]),
                sum(r["tokens"]) / sum(r["passes"]),
                sum(r["time"]),
                sum(greedy_time) / sum(r["time"]),
                min(per_prompt),
                sum(s < 0.9 for s in per_prompt),
                "yes",
            ]
        )
    header = [
        "method",
        "passes/token",
        "tokens/pass",
        "total s",
        "speed-up",
        "worst prompt",
        "prompts < 0.9x",
        "identical",
    ]
    table = format_table(header, rows)
    command = "hf-fastattn bench jacobi " + " ".join(argv or [])
    info = f"{len(prompts)} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens; {machine_line()}"
    note = (
        f"Speed-up: total greedy `generate` time / total time of the method; worst prompt: the lowest per-prompt "
        f"ratio (best of {args.repeats} interleaved runs each). Outputs asserted identical to greedy's. "
        f"`{REFERENCE}` is our loop making no guesses (plain greedy steps): the share of a speed-up owed to the "
        f"loop rather than to guesses."
    )
    print(table)
    print(info)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "quick_jacobi" if args.quick else "jacobi")
    with open(stem + ".md", "w") as f:
        f.write(f"`{command.strip()}`\n\n{info}\n\n{table}\n\n{note}\n")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f)
    plot(results, methods, stem + ".png")
    print(f"wrote {stem}.md, .json, .png")
    return 0
