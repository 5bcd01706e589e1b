"""Jacobi decoding against greedy `generate` on held-out tinyshakespeare prompts (wall-clock, forward passes).

    hf-fastattn bench jacobi [--prompts 50] [--new-tokens 128] [--modes ...] [--threads 1] [--out benchmarks/results]
    hf-fastattn bench jacobi --model smollm2-135m [--thread-counts 1 2] [--new-tokens 96] [--repeats 2]

With --model, a pretrained chat model instead: chat prompts per task type (summarize, rewrite, list characters,
continue, answer from a passage, edit code, two open-ended), side by side in one run: greedy `generate`,
transformers' prompt lookup, lookahead, jacobi, gs_jacobi, hybrid at each thread count (batch 1), then greedy /
lookahead / hybrid at batch 4, and plain vs lookahead sampling at temperature 0.7. Writes
jacobi_<model>.md/.json under --out.

The model is `hf_fastattn.showcase.tinylm.get_tiny_llama()` (a small Llama trained on tinyshakespeare, cached after the first
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

from ...generation.jacobi import MODES, jacobi_decoding
from .utils import format_table, machine_line, torch_threads


def load_model(quick: bool):
    """The trained tiny Llama and its held-out text; with `quick`, a random tiny model on random text (offline)."""
    if quick:
        from ..tinylm import tiny_llama

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
    parser.add_argument(
        "--model", default=None,
        help="a pretrained chat model (short name such as smollm2-135m, folder or Hub id): run the chat-prompt "
        "comparison (greedy, prompt lookup, every mode, batch 4, sampling) instead of the tiny teacher (default: the "
        "tiny teacher)",
    )
    parser.add_argument(
        "--thread-counts", type=int, nargs="+", default=[1, 2],
        help="with --model: torch thread counts to time (default: %(default)s)",
    )
    parser.add_argument(
        "--passage-chars", type=int, default=1200, help="with --model: characters of the held-out passage (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.model is not None:
        if args.quick:
            args.new_tokens, args.repeats, args.thread_counts = 16, 1, args.thread_counts[:1]
        elif "--new-tokens" not in (argv or []):
            args.new_tokens = 96
        if "--repeats" not in (argv or []):
            args.repeats = min(args.repeats, 2)
        return run_real(args, argv)
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


# --------------------------------------------------------------------------------------------------------------------
# A real pretrained chat model (--model smollm2-135m)
# --------------------------------------------------------------------------------------------------------------------

CODE = '''def total_price(items, tax):
    s = 0
    for it in items:
        s = s + it["price"] * it["qty"]
    s = s + s * tax
    return s


def cheapest(items):
    best = None
    for it in items:
        if best is None or it["price"] < best["price"]:
            best = it
    return best
'''

FACTS = (
    "The Lindqvist Observatory stands on a granite ridge 1,140 metres above the town of Varby. It was founded in "
    "1897 by the astronomer Henrika Lindqvist, who paid for its first telescope, a 40-centimetre refractor, with "
    "the sale of her family's timber mill. In 1931 a 1.2-metre reflecting telescope was added, and in 1978 the old "
    "refractor was moved to the town museum. Today the observatory runs public viewing nights every Friday from "
    "April to October, and its small staff of six studies variable stars and the dust around young suns."
)


def chat_tasks(passage: str) -> list[tuple[str, str]]:
    """(task type, user message) pairs written for the benchmark: input-grounded tasks over a held-out passage of
    tinyshakespeare, a paragraph of facts and a code snippet (written here), and two open-ended prompts."""
    return [
        ("summarize", f"Summarize the following passage in a few sentences.\n\n{passage}"),
        ("rewrite", f"Rewrite the following passage in plain modern English, line by line.\n\n{passage}"),
        ("characters", f"List the characters who speak in this passage, with one line about each.\n\n{passage}"),
        ("continue", f"Continue this scene in the same style for a few more lines.\n\n{passage}"),
        ("answer", f"{FACTS}\n\nUsing only the text above: when was the observatory founded, by whom, and what "
         "happened to its first telescope?"),
        ("edit code", f"Rename the variable `s` to `subtotal` and `it` to `item` in this code; return the whole "
         f"code.\n\n```python\n{CODE}```"),
        ("open-ended", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("open-ended", "Explain how a refrigerator keeps food cold, for a ten-year-old."),
    ]  # fmt: skip


GREEDY_METHODS = ["greedy", "prompt_lookup", "lookahead", "jacobi", "gs_jacobi", "hybrid"]


def _generate(model, ids, mask, method: str, new_tokens: int, sample: bool = False, seed: int = 0):
    """(seconds, sequences, forward passes) of one generation (prompt lookup's forwards are counted by a hook)."""
    kwargs = dict(max_new_tokens=new_tokens, attention_mask=mask, pad_token_id=0)
    if sample:
        kwargs.update(do_sample=True, temperature=0.7, top_k=50, top_p=0.95)
        torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    counter = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
    try:
        start = time.perf_counter()
        if method == "greedy":
            out = model.generate(ids, **kwargs)
        elif method == "prompt_lookup":
            out = model.generate(ids, prompt_lookup_num_tokens=10, **kwargs)
        else:
            out = model.generate(ids, custom_generate=jacobi_decoding, mode=method, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return seconds, out, counter["n"]


def _chat_prompts(tokenizer, tasks, batch: int):
    """Tokenized prompts `(ids, mask)`, one per task (batch 1) or groups of `batch` left-padded together."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
        for _, msg in tasks
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    groups = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    out = []
    for group in groups:
        enc = tokenizer(group, return_tensors="pt", padding=True, add_special_tokens=False)
        out.append((enc["input_ids"], enc["attention_mask"] if batch > 1 else None))
    return out


def _time_setting(model, prompts, methods, new_tokens, repeats, sample=False, label=""):
    """Per method: best seconds per prompt (interleaved rounds), forwards and new tokens per prompt, and whether each
    output equals the first method's."""
    res = {m: {"time": [], "passes": [], "tokens": [], "same": []} for m in methods}
    for i, (ids, mask) in enumerate(prompts):
        best, outs = {m: float("inf") for m in methods}, {}
        for r in range(repeats):
            for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
                seconds, out, passes = _generate(model, ids, mask, method, new_tokens, sample, seed=1000 * i + r)
                best[method] = min(best[method], seconds)
                outs[method] = (out, passes)
        for m in methods:
            out, passes = outs[m]
            res[m]["time"].append(best[m])
            res[m]["passes"].append(passes)
            res[m]["tokens"].append(out.shape[1] - ids.shape[1])  # per row: a batch forward advances every row
            res[m]["same"].append(torch.equal(out, outs[methods[0]][0]))
        line = "  ".join(f"{m} {best[methods[0]] / best[m]:.2f}x" for m in methods[1:])
        print(f"{label} prompt {i + 1}/{len(prompts)}: {line}", flush=True)
    return res


def _rows(res, methods, reference="prompt_lookup", identical=True, labels=None):
    base = res[methods[0]]["time"]
    rows = []
    for m in methods:
        r = res[m]
        per_prompt = [g / t for g, t in zip(base, r["time"], strict=True)]
        vs_ref = (
            f"{sum(res[reference]['time']) / sum(r['time']):.2f}x" if reference in res else "-"
        )
        rows.append([
            (labels or {}).get(m, m),
            sum(r["passes"]) / sum(r["tokens"]),
            sum(r["tokens"]) / sum(r["passes"]),
            f"{sum(base) / sum(r['time']):.2f}x",
            vs_ref,
            f"{min(per_prompt):.2f}x",
            f"{sum(r['same'])}/{len(r['same'])}" if identical else "-",
        ])  # fmt: skip
    return rows


def _kind_rows(res, methods, kinds, reference="prompt_lookup"):
    """Per method: total time of greedy (and of `reference`) over the method's, on the input-grounded prompts and
    on the open-ended ones apart (the issue's targets are per kind)."""
    groups = {
        "grounded": [i for i, k in enumerate(kinds) if k != "open-ended"],
        "open-ended": [i for i, k in enumerate(kinds) if k == "open-ended"],
    }

    def ratio(method, base, idx):
        if base not in res or not idx:
            return "-"
        return f"{sum(res[base]['time'][i] for i in idx) / sum(res[method]['time'][i] for i in idx):.2f}x"

    return [
        [m, *(ratio(m, base, idx) for idx in groups.values() for base in (methods[0], reference))]
        for m in methods[1:]
    ]


KIND_HEADER = ["method", "grounded vs greedy", "grounded vs prompt lookup", "open-ended vs greedy",
               "open-ended vs prompt lookup"]  # fmt: skip
HEADER = ["method", "forwards/token", "tokens/forward", "vs greedy", "vs prompt lookup", "worst prompt", "identical"]


def run_real(args, argv) -> int:
    """The README table for a pretrained chat model: every method side by side on chat prompts per task type."""
    import os

    from ...loading import load_causal_lm
    from ..tinylm import load_corpus

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_causal_lm(args.model, dtype=torch.float32)
    model.eval()
    text = load_corpus()
    start = text.index("\n\n", int(len(text) * 0.93)) + 2  # the held-out tail of tinyshakespeare
    passage = text[start : start + args.passage_chars].rsplit("\n", 1)[0]
    tasks = chat_tasks(passage)
    if args.quick:
        tasks = tasks[:2]
    sections, results = [], {}
    single = _chat_prompts(tokenizer, tasks, 1)
    methods = list(GREEDY_METHODS)
    for threads in args.thread_counts:
        with torch_threads(threads):
            _generate(model, *single[0], "lookahead", 8)  # warm-up; measures the forward cost curve once
            _generate(model, *single[0], "greedy", 8)
            chosen = methods if threads == args.thread_counts[0] else ["greedy", "prompt_lookup", "lookahead"]
            res = _time_setting(model, single, chosen, args.new_tokens, args.repeats, label=f"{threads} thread(s)")
            results[f"greedy_t{threads}_b1"] = res
            sections.append((f"greedy decoding, {threads} thread(s), batch 1", format_table(HEADER, _rows(res, chosen))))
            per_task = [
                [kind, *(f"{res['greedy']['time'][i] / res[m]['time'][i]:.2f}x" for m in chosen[1:])]
                for i, (kind, _) in enumerate(tasks)
            ]
            sections.append((f"per prompt, {threads} thread(s) (vs greedy)", format_table(["task", *chosen[1:]], per_task)))
            kinds = [kind for kind, _ in tasks]
            sections.append((f"by task kind, {threads} thread(s): {len(kinds) - kinds.count('open-ended')} "
                             f"input-grounded prompts, {kinds.count('open-ended')} open-ended",
                             format_table(KIND_HEADER, _kind_rows(res, chosen, kinds))))  # fmt: skip
    threads = args.thread_counts[0]
    with torch_threads(threads):
        if not args.quick:  # batch 4: transformers' assisted decoding (prompt lookup) is batch 1 only
            batched = _chat_prompts(tokenizer, tasks, 4)
            _generate(model, *batched[0], "lookahead", 8)  # warm-up: the cost curve and linear routes at batch 4
            _generate(model, *batched[0], "greedy", 8)
            chosen = ["greedy", "lookahead", "hybrid"]
            res = _time_setting(model, batched, chosen, args.new_tokens, args.repeats, label="batch 4")
            results["greedy_b4"] = res
            sections.append((f"greedy decoding, {threads} thread(s), batch 4 (prompt lookup refuses batch > 1)",
                             format_table(HEADER, _rows(res, chosen))))  # fmt: skip
        chosen = ["greedy", "lookahead"]  # sampling: identical outputs are not expected, only the distribution
        res = _time_setting(model, single, chosen, args.new_tokens, 1, sample=True, label="sampling")
        results["sample_t0.7"] = res
        sections.append((f"sampling (temperature 0.7, top-k 50, top-p 0.95), {threads} thread(s), batch 1",
                         format_table(HEADER, _rows(res, chosen, identical=False, labels={"greedy": "plain sampling", "lookahead": "lookahead sampling"}))))  # fmt: skip

    command = "hf-fastattn bench jacobi " + " ".join(argv or [])
    info = (
        f"{args.model}, fp32; {len(tasks)} chat prompts ({', '.join(k for k, _ in tasks)}), {args.new_tokens} new "
        f"tokens, best of {args.repeats} interleaved runs (sampling: 1); torch threads per section as titled; {machine_line(threads=False)}"
    )
    note = (
        "forwards/token: model forwards per new token (greedy: 1); vs greedy / vs prompt lookup: total time of greedy "
        "(or of transformers' `prompt_lookup_num_tokens=10`) over the method's; worst prompt: the lowest per-prompt "
        "ratio to greedy; identical: outputs equal to greedy `generate`'s (fp32: a near-tie of two logits can flip "
        "between a one-token and a multi-token forward)."
    )
    body = "\n\n".join(f"**{title}**\n\n{table}" for title, table in sections)
    print(body)
    print(info)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"jacobi_{args.model.replace('/', '_')}" + ("_quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(f"`{command.strip()}`\n\n{info}\n\n{body}\n\n{note}\n")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f)
    print(f"wrote {stem}.md, .json")
    return 0
