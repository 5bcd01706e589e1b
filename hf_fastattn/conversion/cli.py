"""`hf-fastattn convert SRC --method M (--train-file TEXT | --dataset NAME) --max-steps N --out DIR`.

Loads SRC (a local directory or a hub id; never modified), converts it, uptrains it with the recipe of
`hf_fastattn.conversion.distill` (attention transfer for t2r / hedgehog, then LoRA or full fine-tuning), prints the
validation perplexity (the last `--val-fraction` of the text) before and after, and saves model and tokenizer to DIR.
Runs under `accelerate launch` too (only the main process prints and saves).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

DEFAULT_FINETUNE = {
    "t2r": "full",
    "hedgehog": "lora",
    "linear": "full",
    "fast": "full",
    "mqa": "full",
    "gqa": "full",
}


def build_parser() -> argparse.ArgumentParser:
    from .core import CONVERSION_METHODS, get_method

    get_method("t2r")  # registers the built-in methods
    p = argparse.ArgumentParser(prog="hf-fastattn convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="local model directory or hub id (not modified)")
    p.add_argument("--method", required=True, help=f"one of {sorted(CONVERSION_METHODS)}")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="local text file")
    data.add_argument("--dataset", help="a datasets name or local dataset directory with a 'text' column")
    p.add_argument("--out", required=True, help="output directory (model + tokenizer)")
    p.add_argument("--max-steps", type=int, default=200, help="fine-tuning steps (stage 2)")
    p.add_argument(
        "--transfer-steps",
        type=int,
        default=None,
        help="attention-transfer steps (default: t2r 0, hedgehog max-steps)",
    )
    p.add_argument(
        "--finetune",
        choices=["lora", "full", "attention", "none"],
        default=None,
        help="stage 2 (default per method)",
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="global batch size")
    p.add_argument(
        "--lr", type=float, default=None, help="stage-2 learning rate (default 1e-3 lora, 3e-4 otherwise)"
    )
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument(
        "--score-weight",
        type=float,
        default=0.0,
        help="attention transfer: weight of Hedgehog's attention-score loss added to the output MSE "
        "(t2r / hedgehog / linear without --hybrid)",
    )
    p.add_argument("--feature-dim", type=int, default=None, help="t2r / hedgehog feature size")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--hybrid", action="store_true", help="t2r / hedgehog: LoLCATs sliding-window hybrid (softmax over the last --window tokens)")
    p.add_argument("--window", type=int, default=64, help="hybrid softmax window")
    p.add_argument(
        "--window-init", type=float, default=0.0, help="hybrid: starting logit of the window's share (0: 1/2)"
    )
    p.add_argument("--num-key-value-heads", type=int, default=None, help="gqa: K/V heads after pooling")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--max-val-chars", type=int, default=None, help="evaluate on at most this much held-out text"
    )
    p.add_argument(
        "--save-steps", type=int, default=0, help="safetensors checkpoints every N steps (in DIR/checkpoints)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def method_options(args) -> dict:
    options = {}
    if args.method in ("t2r", "hedgehog") and args.feature_dim is not None:
        options["feature_dim"] = args.feature_dim
    if args.method in ("t2r", "hedgehog") and args.hybrid:
        options.update(hybrid=True, window=args.window, window_init=args.window_init)
    if args.method == "gqa":
        options["num_key_value_heads"] = args.num_key_value_heads
    ignored = [
        flag
        for flag, used in (
            ("--feature-dim", args.feature_dim is None or args.method in ("t2r", "hedgehog")),
            ("--hybrid", not args.hybrid or args.method in ("t2r", "hedgehog")),
            ("--num-key-value-heads", args.num_key_value_heads is None or args.method == "gqa"),
            ("--score-weight", args.score_weight == 0 or args.method in ("t2r", "hedgehog", "linear")),
        )
        if not used
    ]
    if ignored:
        raise ValueError(f"option(s) {ignored} do not apply to method {args.method!r}")
    if args.score_weight and args.hybrid:
        raise ValueError("--score-weight compares plain linear attention's weights with softmax's; not with --hybrid")
    return options


def _load(src: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    looks_local = src.startswith((".", "/", "~")) or os.sep in src and os.path.exists(src.split(os.sep)[0])
    if looks_local and not os.path.isdir(os.path.expanduser(src)):
        raise ValueError(f"SRC {src!r} is not a directory")
    try:
        config = AutoConfig.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise ValueError(
            f"cannot load {src!r} (not a local model directory, and the hub id could not be loaded): {e}"
        ) from e
    from .families import FAMILIES, base_model_type

    family = FAMILIES.get(base_model_type(config))
    auto = AutoModelForCausalLM if family is None or family.causal else AutoModel
    return auto.from_pretrained(src), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"hf-fastattn convert: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from .core import convert, method_config
    from .distill import UptrainConfig, lm_dataset, load_text, perplexity, split_text, uptrain
    from .families import family_of

    main_process = int(os.environ.get("RANK", "0")) == 0
    say = print if main_process else (lambda *a, **k: None)
    options = method_options(args)
    method_config(args.method, **options)  # validate before the slow parts
    out = pathlib.Path(args.out).expanduser().resolve()
    if os.path.isdir(os.path.expanduser(args.src)) and out == pathlib.Path(args.src).expanduser().resolve():
        raise ValueError("--out must differ from SRC (SRC is never modified)")
    text = load_text(args.train_file) if args.train_file else load_text(args.dataset)
    train_text, val_text = split_text(text, args.val_fraction)
    if args.max_val_chars:
        val_text = val_text[: args.max_val_chars]
    model, tokenizer = _load(args.src)
    family = family_of(model)
    finetune = args.finetune or DEFAULT_FINETUNE[args.method]
    transfer = (
        args.transfer_steps
        if args.transfer_steps is not None
        else (args.max_steps if args.method == "hedgehog" else 0)
    )
    lr = args.lr or (1e-3 if finetune == "lora" else 3e-4)
    if not family.causal and args.max_steps and finetune != "none":
        say(
            "encoder: stage 2 (masked-LM fine-tuning) needs a masked-LM head; running attention transfer only"
        )
        finetune = "none"
    before = perplexity(model, tokenizer, val_text, args.seq_len) if family.causal else None
    if before is not None:
        say(f"validation perplexity before conversion: {before:.3f}")
    converted = convert(model, args.method, **options)
    train = lm_dataset(train_text, tokenizer, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = UptrainConfig(
            transfer_steps=transfer,
            transfer_lr=args.transfer_lr,
            transfer_score_weight=args.score_weight,
            finetune=finetune,
            finetune_steps=args.max_steps,
            finetune_lr=lr,
            lora_rank=args.lora_rank,
            batch_size=args.batch_size,
            seed=args.seed,
            output_dir=str(out / "checkpoints") if args.save_steps else tmp,
            save_steps=args.save_steps,
        )
        converted = uptrain(converted, train, cfg)
    if family.causal:
        after = perplexity(converted, tokenizer, val_text, args.seq_len)
        say(
            f"validation perplexity after conversion ({args.method}): {after:.3f} ({after / before:.3f}x the original)"
        )
    if main_process:
        converted.save_pretrained(out)
        tokenizer.save_pretrained(out)
        say(f"saved to {out}")
    return 0
