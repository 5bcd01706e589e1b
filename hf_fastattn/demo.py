"""`hf-fastattn demo`: what the library does, offline, in one command.

    hf-fastattn demo                    # about 8 minutes on 2 CPU cores the first time (the teacher's training,
                                        # about 2.5 of them, is cached on disk)
    hf-fastattn demo --quick            # about a minute: a much smaller teacher, fewer steps and prompts
    hf-fastattn demo --model PATH_OR_HUB_ID   # the same on your causal LM instead of the embedded teacher

The steps, in the order `main` runs them:

1. Teacher: a small softmax Llama trained on the packaged tinyshakespeare (`hf_fastattn.tinylm.get_tiny_llama`,
   cached on disk after the first run), or the `--model` checkpoint.
2. Conversion: the teacher converted with "t2r", "hedgehog" and "mqa" (`hf_fastattn.convert`) and uptrained on a
   small token budget with the recipe of `hf-fastattn bench conversion` (attention transfer, then full or LoRA
   fine-tuning with the HF `Trainer`); beside the hedgehog hybrid (softmax over the last 64 tokens + linear
   attention), its control "window-only" (the teacher restricted to those 64 tokens, untrained). Every model is
   saved under `--out`/models, to try with `hf-fastattn generate` or `hf-fastattn ddgviz`.
3. Measurements:
   - validation perplexity of the teacher and of every converted model (every held-out token);
   - decoding at growing context lengths, up to where the curves cross and beyond: the cache `generate` keeps (a
     growing K/V `DynamicCache` for softmax and MQA, a constant-size `hf_fastattn.RecurrentCache` for the T2R and
     hedgehog models) and the time per step, with the context from which each converted model wins marked;
   - Jacobi decoding ("jacobi" and "lookahead") against greedy `generate` on the teacher: speed-up, with the outputs
     asserted identical token for token.
4. Report, in `--out` (default `outputs/demo`): results.md (the tables), results.json (every number), PNG plots and
   report.html (self-contained: tables and plots embedded).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import hf_fastattn  # noqa: F401  (registers the attention implementations and the generate hook)

from .bench.conversion import convert_and_uptrain
from .bench.jacobi import make_prompts, run_one, time_methods
from .bench.utils import cache_nbytes, crossover, describe_crossover, format_table, machine_line, torch_threads
from .tinylm import get_tiny_llama, lm_dataset, load_corpus, perplexity, split_corpus

METHODS = ("t2r", "hedgehog", "mqa")
# untrained controls, each shown beside the converted model it explains (`bench.conversion.RECIPES`)
CONTROLS = {"window-only": "hedgehog"}
DECODE_MODELS = ("teacher", "t2r", "hedgehog", "mqa")
JACOBI_MODES = ("jacobi", "lookahead")


class DemoError(Exception):
    """A problem with the user's input (a bad --model): reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# Sizes: the full demo and --quick differ only here


@dataclass(frozen=True)
class Sizes:
    teacher: dict  # get_tiny_llama's arguments (the cache key of the trained teacher)
    seq_len: int  # training and perplexity windows
    batch_size: int
    uptrain_tokens: int  # conversion budget per method (t2r: ~10% of the full teacher's training tokens)
    val_chars: int | None  # held-out characters scored for perplexity (None: the whole validation split)
    contexts: tuple[int, ...]  # prompt lengths of the decode measurement
    decode_steps: int  # new tokens per decode measurement
    decode_repeats: int  # runs per (model, context); the fastest is kept
    jacobi_prompts: int
    jacobi_prompt_tokens: int
    jacobi_new_tokens: int
    jacobi_repeats: int  # timed runs per (prompt, method); the best is kept


FULL = Sizes(
    teacher={},  # the default tiny Llama (500 steps of 16 x 128 tokens), shared with `hf-fastattn bench jacobi`
    seq_len=128,
    batch_size=16,
    uptrain_tokens=50 * 16 * 128,  # 10% of the teacher's training tokens, as in `hf-fastattn bench conversion`
    val_chars=None,
    contexts=(64, 512, 2048, 8192, 16384),
    decode_steps=64,
    decode_repeats=3,
    jacobi_prompts=8,
    jacobi_prompt_tokens=64,
    jacobi_new_tokens=96,
    jacobi_repeats=2,
)
QUICK = Sizes(
    teacher=dict(
        steps=300,
        seq_len=64,
        batch_size=8,
        lr=1e-2,
        warmup=10,
        config_overrides=dict(hidden_size=64, num_layers=2, num_heads=4),
    ),
    seq_len=64,
    batch_size=8,
    uptrain_tokens=40 * 8 * 64,
    val_chars=6000,
    contexts=(32, 512, 2048, 8192),
    decode_steps=16,
    decode_repeats=2,
    jacobi_prompts=3,
    jacobi_prompt_tokens=32,
    jacobi_new_tokens=48,
    jacobi_repeats=1,
)


# ---------------------------------------------------------------------------------------------------------------
# 1. the teacher


def load_teacher(model_name: str | None, sizes: Sizes):
    """(model, tokenizer, tokens it was trained on or None): the embedded teacher, or `model_name`."""
    if model_name is None:
        model, tokenizer = get_tiny_llama(**sizes.teacher)
        return model.eval(), tokenizer, getattr(model.config, "tinylm_train_tokens", None)

    from .conversion.families import family_of
    from .loading import ModelLoadError, load_causal_lm

    try:
        model, tokenizer = load_causal_lm(model_name, flag="--model")
    except ModelLoadError as e:
        raise DemoError(str(e)) from e
    try:
        family_of(model)
    except ValueError as e:
        raise DemoError(f"--model {model_name!r} cannot be converted: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, None


# ---------------------------------------------------------------------------------------------------------------
# 2. conversion


def convert_all(teacher, tokenizer, train_text: str, sizes: Sizes, workdir: str) -> dict:
    """{name: (converted model, training tokens, seconds)}: each of `METHODS` uptrained on `sizes.uptrain_tokens`,
    and each of `CONTROLS` converted untrained (0 tokens)."""
    dataset = lm_dataset(train_text, tokenizer, sizes.seq_len)
    steps = max(1, sizes.uptrain_tokens // (sizes.batch_size * sizes.seq_len))
    converted = {}
    for method in (*METHODS, *CONTROLS):
        what = "converting (untrained control)" if method in CONTROLS else f"converting and uptraining for {steps} steps"
        print(f"\n== {method}: {what}", flush=True)
        start = time.perf_counter()
        model, trained = convert_and_uptrain(
            teacher, method, dataset, steps, sizes.batch_size, os.path.join(workdir, method)
        )
        converted[method] = (model, trained * sizes.batch_size * sizes.seq_len, time.perf_counter() - start)
    return converted


def save_models(models: dict, tokenizer, folder: Path) -> dict[str, str]:
    """Save every model with the tokenizer under `folder`/<name> (reload with `AutoModelForCausalLM` after
    `import hf_fastattn`; try with `hf-fastattn generate` / `ddgviz`). Returns {name: path}."""
    paths = {}
    for name, model in models.items():
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# 3. measurements


class StepClock(LogitsProcessor):
    """Records the time of every decoding step (generate calls its logits processors once per new token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def decode_profile(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy `generate` of `new_tokens` after `prompt` `[1, P]`: the median seconds per step (prefill excluded),
    the cache generate chose and its bytes at the end."""
    clock = StepClock()
    out = model.generate(
        prompt.to(model.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True,
        pad_token_id=model.config.eos_token_id,
    )
    cache = getattr(out, "cache", None) or out.past_key_values  # "cache" from transformers 5.24
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "s_per_token": statistics.median(steps),
        "cache": type(cache).__name__,
        "cache_bytes": cache_nbytes(cache),
    }


def measure_decoding(models: dict, val_ids: torch.Tensor, sizes: Sizes) -> list[dict]:
    """One record per (model, context length), model by model. Every pair runs `sizes.decode_repeats` times,
    interleaved so that a busy spell of a shared machine hits all alike, and the fastest run is kept."""
    # beyond the teacher's trained length too: these are timings (RoPE itself has no limit), not quality
    contexts = [c for c in sizes.contexts if c + sizes.decode_steps <= len(val_ids)]
    for model in models.values():
        decode_profile(model, val_ids[None, :16], 4)  # warm-up
    best = {}
    runs = [(name, context) for _ in range(sizes.decode_repeats) for context in contexts for name in models]
    for name, context in tqdm(runs, desc="decoding at growing contexts"):
        profile = decode_profile(models[name], val_ids[None, :context], sizes.decode_steps)
        if (name, context) not in best or profile["s_per_token"] < best[name, context]["s_per_token"]:
            best[name, context] = profile
    return [{"model": name, "context": context, **best[name, context]} for name in models for context in contexts]


def crossovers(decoding: list[dict]) -> dict:
    """{model: {"time": crossover, "cache": crossover}} against the teacher, for every decoded model but it."""
    names = dict.fromkeys(d["model"] for d in decoding)
    return {
        name: {
            "time": crossover(decoding, name, "teacher", "s_per_token"),
            "cache": crossover(decoding, name, "teacher", "cache_bytes"),
        }
        for name in names
        if name != "teacher"
    }


@torch.no_grad()
def measure_jacobi(model, val_ids: torch.Tensor, sizes: Sizes) -> dict:
    """Greedy vs the Jacobi modes on held-out prompts (with `hf-fastattn bench jacobi`'s helpers): summed best
    times, forward passes and new tokens per method. Raises AssertionError if any output differs from greedy's."""
    prompts = [p.to(model.device) for p in make_prompts(val_ids, sizes.jacobi_prompts, sizes.jacobi_prompt_tokens)]
    methods = ["greedy", *JACOBI_MODES]
    for method in methods:  # warm-up
        run_one(model, prompts[0], method, 8, None)
    totals = {m: {"seconds": 0.0, "passes": 0, "tokens": 0} for m in methods}
    for prompt in tqdm(prompts, desc="Jacobi vs greedy"):
        best, outputs = time_methods(model, prompt, methods, sizes.jacobi_new_tokens, None, sizes.jacobi_repeats)
        for method, (out, passes) in outputs.items():  # outputs are identical to greedy's, or we did not get here
            totals[method]["seconds"] += best[method]
            totals[method]["passes"] += passes
            totals[method]["tokens"] += out.shape[1] - prompt.shape[1]
    compared = len(prompts) * len(JACOBI_MODES)
    return {"totals": totals, "identical": True, "outputs_compared": compared}


# ---------------------------------------------------------------------------------------------------------------
# 4. report: tables, plots, HTML


QUALITY = "Validation perplexity (held-out tinyshakespeare)"
DECODING = "Decoding: cache and time per token against context length"
CROSSOVER = "Where each converted model overtakes the teacher in decoding"
JACOBI = "Jacobi decoding on the teacher vs greedy generate"


def results_tables(results: dict) -> dict[str, tuple[list, list]]:
    """{title: (header, rows)} for the four tables."""
    teacher_ppl = results["models"]["teacher"]["val_ppl"]
    quality = [
        [name, f"{r['val_ppl']:.2f}", f"{r['val_ppl'] / teacher_ppl:.4f}", r["train_tokens"], r["seconds"], r["attention"]]
        for name, r in results["models"].items()
    ]
    teacher_ms = {d["context"]: d["s_per_token"] for d in results["decoding"] if d["model"] == "teacher"}
    decode = [
        [
            d["model"],
            d["context"],
            d["cache"],
            f"{d['cache_bytes'] / 2**20:.2f}",
            d["s_per_token"] * 1000,
            f"{teacher_ms[d['context']] / d['s_per_token']:.2f}x",
        ]
        for d in results["decoding"]
    ]
    crossing = [
        [name, describe_crossover(c["time"]), describe_crossover(c["cache"])]
        for name, c in results["crossovers"].items()
    ]
    totals = results["jacobi"]["totals"]
    greedy, identical = totals["greedy"]["seconds"], results["jacobi"]["identical"]
    jacobi = [
        [m, t["tokens"] / t["passes"], t["seconds"], greedy / t["seconds"], "yes" if identical else "NO"]
        for m, t in totals.items()
    ]
    return {
        QUALITY: (["model", "val ppl", "x teacher", "train tokens", "seconds", "attention"], quality),
        DECODING: (["model", "context", "cache", "cache MiB", "ms/token", "speed vs teacher"], decode),
        CROSSOVER: (["model", "faster per token than the teacher", "smaller cache than the teacher"], crossing),
        JACOBI: (["method", "tokens/forward", "total s", "speed-up", "identical to greedy"], jacobi),
    }


def section_notes(results: dict) -> dict[str, str]:
    """{title: a short paragraph}: what each table measured and what to conclude from this run's numbers."""
    models = results["models"]
    teacher_ppl = models["teacher"]["val_ppl"]
    ratio = lambda name: models[name]["val_ppl"] / teacher_ppl
    controls = "; ".join(
        f"{target} scores {ratio(target):.3f}x the teacher's perplexity, its control {control} (the softmax window "
        f"alone, untrained) {ratio(control):.3f}x: "
        + ("the linear part adds what lies beyond the window" if ratio(target) < ratio(control)
           else "on these short validation windows the softmax window carries the hybrid, and this table cannot "
           "tell what its linear part adds (`hf-fastattn bench conversion --seq-len 512` can)")
        for control, target in CONTROLS.items()
        if control in models and target in models
    )
    cross = results["crossovers"]
    cross_text = "; ".join(
        f"{name} is faster per token {describe_crossover(c['time'])} and holds less cache "
        f"{describe_crossover(c['cache'])}"
        for name, c in cross.items()
    )
    longest = max(d["context"] for d in results["decoding"])
    totals = results["jacobi"]["totals"]
    speedups = ", ".join(
        f"{m} {totals['greedy']['seconds'] / t['seconds']:.2f}x" for m, t in totals.items() if m != "greedy"
    )
    return {
        QUALITY: (
            "Perplexity on the held-out last 10% of the corpus, every token scored in windows of "
            f"{results['sizes']['seq_len']} tokens, the same computation for every model. Lower is better; "
            "'x teacher' is the ratio to the softmax teacher the others were converted from, on a token budget "
            f"of about a tenth of its training. {controls}."
        ),
        DECODING: (
            "Greedy `generate` after prompts of growing length (the median step time of the fastest run, prefill "
            "excluded) and the bytes of the cache `generate` kept. Softmax attention's K/V cache (teacher, mqa) "
            "grows with the context and each step reads all of it; the recurrent cache of t2r and hedgehog keeps "
            "a fixed-size state (plus, for the hybrid, the last window's keys and values), so its bytes and step "
            f"time stay flat. Contexts past the teacher's training length ({results['sizes']['seq_len']} tokens "
            "per window) measure cost only, not quality."
        ),
        CROSSOVER: (
            "The context from which each model's curve passes under the teacher's (interpolated between the "
            f"measured contexts, up to {longest:,} tokens): {cross_text}. Below that point softmax attention is "
            "cheaper; this is the length where conversion starts to pay for decoding."
        ),
        JACOBI: (
            "Greedy decoding of held-out prompts with Jacobi iterations and lookahead n-gram guesses, on the "
            "teacher, against transformers' greedy `generate`; every output was checked identical token for "
            f"token. Speed-ups in this run: {speedups}. Tokens per forward above 1 means guesses were accepted; "
            "on a CPU a forward that feeds more tokens costs more, so fewer forwards is not always less time."
        ),
    }


def _context_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_all(results: dict, out: Path) -> list[Path]:
    """perplexity.png, decoding.png (cache size and step time against context, crossovers marked) and jacobi.png
    under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    names = list(results["models"])
    colors = ["gray" if n == "teacher" else "lightgray" if n in CONTROLS else "C0" for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar(names, [results["models"][n]["val_ppl"] for n in names], color=colors)
    ax.bar_label(bars, [f"{results['models'][n]['val_ppl']:.2f}" for n in names], fontsize=8)
    ax.set(ylabel="validation perplexity", title="teacher, converted models (blue) and controls (light gray)")
    ax.margins(y=0.12)
    save(fig, "perplexity.png")

    fig, (size_ax, time_ax) = plt.subplots(1, 2, figsize=(11.5, 4))
    contexts = sorted({d["context"] for d in results["decoding"]})
    for i, name in enumerate(dict.fromkeys(d["model"] for d in results["decoding"])):
        rows = [d for d in results["decoding"] if d["model"] == name]
        label = f"{name} ({rows[0]['cache']})"
        color = "gray" if name == "teacher" else f"C{i}"
        size_ax.plot([d["context"] for d in rows], [d["cache_bytes"] / 2**20 for d in rows], "o-", color=color, label=label)
        time_ax.plot([d["context"] for d in rows], [d["s_per_token"] * 1000 for d in rows], "o-", color=color, label=label)
        crossing = results["crossovers"].get(name)
        for ax, key in ((time_ax, "time"), (size_ax, "cache")):
            if crossing and crossing[key]["status"] == "crosses":
                ax.axvline(crossing[key]["from"], color=color, ls=":", lw=1)
                ax.annotate(
                    f"{name} wins from ~{crossing[key]['from']:,}",
                    (crossing[key]["from"], 0.97 - 0.07 * i),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    color=color,
                )
    for ax in (size_ax, time_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(contexts))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _context_label(int(round(x)))))
        ax.grid(alpha=0.3)
    size_ax.set_yscale("log")
    size_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    size_ax.set(xlabel="context (tokens)", ylabel="cache size (MiB, log scale)", title="cache size")
    time_ax.set(xlabel="context (tokens)", ylabel="ms per new token", title="decode step time (dotted: crossover)")
    time_ax.set_ylim(bottom=0)
    size_ax.legend(fontsize=8)
    save(fig, "decoding.png")

    totals = results["jacobi"]["totals"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bars = ax.bar(list(totals), [totals["greedy"]["seconds"] / t["seconds"] for t in totals.values()], color="C2")
    ax.bar_label(
        bars,
        [f"{totals['greedy']['seconds'] / t['seconds']:.2f}x, {t['tokens'] / t['passes']:.2f} tok/fwd" for t in totals.values()],
        fontsize=8,
    )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.margins(y=0.12)
    ax.set(ylabel="speed-up over greedy generate", title="Jacobi decoding (identical outputs)")
    save(fig, "jacobi.png")
    return paths


def html_report(results: dict, tables: dict, plots: list[Path]) -> str:
    """One HTML page with a paragraph, the table and the plot of each section, the plots inlined as base64 PNGs
    (no other files needed)."""

    def cell(c):
        return f"{c:.3g}" if isinstance(c, float) else html.escape(str(c))

    notes = section_notes(results)
    plot_of = {QUALITY: "perplexity", DECODING: "decoding", JACOBI: "jacobi"}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>hf-fastattn demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        "<h1>hf-fastattn demo</h1>",
        f"<p>teacher: {html.escape(results['teacher'])} ({html.escape(results['teacher_size'])}); "
        f"{html.escape(results['machine'])}; "
        f"{results['seconds']:.0f} s in all. The models are saved under "
        f"{html.escape(str(Path(next(iter(results['saved'].values()))).parent))}.</p>",
    ]
    for title, (header, rows) in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(notes[title])}</p><table><tr>")
        parts.append("".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts.extend("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append("</table>")
        for path in plots:
            if path.stem == plot_of.get(title):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                parts.append(f"<img alt='{path.stem}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# the command


def describe(model) -> str:
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return f"{params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, hidden size {config.hidden_size}"


def attention_of(model) -> str:
    config = model.config
    kind = config._attn_implementation
    window = (getattr(config, "fastattn", None) or {}).get("window")
    heads = getattr(config, "num_key_value_heads", None)
    return f"{kind}" + (f" + window {window}" if window else "") + (f", {heads} K/V heads" if heads else "")


def model_order(converted: dict) -> list[str]:
    """The converted models' names, each control right after the model it explains."""
    order = []
    for method in METHODS:
        order += [method, *(c for c, target in CONTROLS.items() if target == method and c in converted)]
    return order


def run(model_name: str | None, sizes: Sizes, out: Path) -> dict:
    """Steps 1 to 3: everything the report shows, as one JSON-able dict; the models are saved under `out`/models."""
    start = time.perf_counter()
    torch.manual_seed(0)
    train_text, val_text = split_corpus(load_corpus())

    print("== 1. teacher", flush=True)
    teacher, tokenizer, teacher_tokens = load_teacher(model_name, sizes)
    val_ids = torch.tensor(tokenizer(val_text, add_special_tokens=False)["input_ids"])  # prompts come from here

    print("\n== 2. conversion", flush=True)
    with tempfile.TemporaryDirectory(prefix="hf-fastattn-demo-") as workdir:  # Trainer output, not kept
        converted = convert_all(teacher, tokenizer, train_text, sizes, workdir)
    converted = {name: converted[name] for name in model_order(converted)}
    saved = save_models(
        {**({} if model_name else {"teacher": teacher}), **{m: c[0] for m, c in converted.items()}},
        tokenizer,
        out / "models",
    )

    print("\n== 3. measurements", flush=True)
    models = {"teacher": teacher, **{m: c[0] for m, c in converted.items()}}
    scored = val_text[: sizes.val_chars] if sizes.val_chars else val_text
    ppl = {}
    for name, model in tqdm(models.items(), desc="perplexity"):
        ppl[name] = perplexity(model, tokenizer, scored, sizes.seq_len)
    decoding = measure_decoding({name: models[name] for name in DECODE_MODELS}, val_ids, sizes)
    jacobi = measure_jacobi(teacher, val_ids, sizes)

    results = {
        "teacher": model_name or "tiny Llama trained on the packaged tinyshakespeare (hf_fastattn.tinylm)",
        "teacher_size": describe(teacher),
        "machine": machine_line(),
        "sizes": asdict(sizes),
        "models": {
            "teacher": {
                "val_ppl": ppl["teacher"],
                "train_tokens": teacher_tokens or "",
                "seconds": "",
                "attention": attention_of(teacher),
            },
            **{
                m: {
                    "val_ppl": ppl[m],
                    "train_tokens": tokens,
                    "seconds": seconds,
                    "attention": attention_of(model) + (f" (control for {CONTROLS[m]}, untrained)" if m in CONTROLS else ""),
                }
                for m, (model, tokens, seconds) in converted.items()
            },
        },
        "saved": saved,
        "decoding": decoding,
        "crossovers": crossovers(decoding),
        "jacobi": jacobi,
    }
    results["seconds"] = time.perf_counter() - start
    return results


def write_report(results: dict, out: Path) -> str:
    """Write results.md, results.json, the plots and report.html under `out`; returns the tables as text."""
    out.mkdir(parents=True, exist_ok=True)
    tables = results_tables(results)
    notes = section_notes(results)
    text = "\n\n".join(
        f"### {title}\n\n{notes[title]}\n\n{format_table(header, rows)}" for title, (header, rows) in tables.items()
    )
    text += f"\n\nteacher: {results['teacher']} ({results['teacher_size']}); {results['machine']}; "
    text += f"{results['seconds']:.0f} s\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = plot_all(results, out)
    (out / "report.html").write_text(html_report(results, tables, plots))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fastattn demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer steps: about a minute")
    parser.add_argument("--model", help="a causal LM to use: local folder or hub id (default: the embedded teacher)")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for the embedded teacher, whose small matrices gain nothing from more and "
        "whose timings a busy second core would make erratic; torch's default with --model)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} is a file; give a folder (it receives the report and the saved models)")
    try:
        with torch_threads(args.threads or (None if args.model else 1)):
            results = run(args.model, QUICK if args.quick else FULL, out)
    except DemoError as e:
        print(f"hf-fastattn demo: error: {e}", file=sys.stderr)
        return 2
    text = write_report(results, out)
    print("\n" + text)
    print(f"wrote {out}/results.md, results.json, perplexity.png, decoding.png, jacobi.png, report.html")
    tried = results["saved"].get("hedgehog") or next(iter(results["saved"].values()))
    print(f"models saved under {out}/models; try one: hf-fastattn generate {tried} --prompt 'ROMEO:' --compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
