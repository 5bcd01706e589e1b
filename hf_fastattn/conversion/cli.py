"""`hf-fastattn convert SRC --method M (--train-file TEXT | --dataset NAME) --max-steps N --out DIR`.

Loads SRC (a local directory or a hub id; never modified), converts it, uptrains it with the recipe of
`hf_fastattn.conversion.distill` (attention transfer for t2r / hedgehog, then LoRA or full fine-tuning), prints the
validation perplexity (the last `--val-fraction` of the text) before and after, and saves model and tokenizer to DIR.
Runs under `accelerate launch` too (only the main process prints and saves).

Every argument is checked before the model is loaded (and the text before the model's weights): a bad one costs
seconds, not the hours of an uptraining whose result cannot be saved. DIR must be missing, empty or an earlier output
of this command; `--overwrite` writes into any other folder (files of the same names are replaced).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import tempfile

from ..cli import ArgumentParser, fail, float_in, int_at_least
from ..loading import check_output_dir, model_load_errors, resolve_model

DEFAULT_FINETUNE = {
    "t2r": "full",
    "hedgehog": "lora",
    "linear": "full",
    "fast": "full",
    "mqa": "full",
    "gqa": "full",
}


def build_parser() -> ArgumentParser:
    from .core import CONVERSION_METHODS, get_method

    get_method("t2r")  # registers the built-in methods
    p = ArgumentParser(
        prog="hf-fastattn convert",
        description="Convert SRC to fast attention, uptrain it on a text, print the validation perplexity before and "
        "after, and save model and tokenizer to --out. Every argument is checked before the model is loaded.",
    )
    p.add_argument("src", help="local model directory or hub id (not modified)")
    p.add_argument("--method", required=True, help=f"one of {sorted(CONVERSION_METHODS)}")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="local UTF-8 text file (the last --val-fraction is held out)")
    data.add_argument("--dataset", help="a datasets name or local dataset directory with a 'text' column")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (model + tokenizer): missing, empty or an earlier output of this command",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that holds something else (files of the same names are replaced, "
        "nothing else is removed)",
    )
    p.add_argument("--max-steps", type=int_at_least(0), default=200, help="fine-tuning steps (stage 2)")
    p.add_argument(
        "--transfer-steps",
        type=int_at_least(0),
        default=None,
        help="attention-transfer steps (default: t2r 0, hedgehog max-steps)",
    )
    p.add_argument(
        "--finetune",
        choices=["lora", "full", "attention", "none"],
        default=None,
        help="stage 2 (default per method: " + ", ".join(f"{m} {f}" for m, f in DEFAULT_FINETUNE.items()) + ")",
    )
    p.add_argument(
        "--seq-len", type=int_at_least(2), default=128, help="tokens per training block and validation window"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="global batch size")
    p.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=None,
        help="stage-2 learning rate (default 1e-3 lora, 3e-4 otherwise)",
    )
    p.add_argument(
        "--transfer-lr", type=float_in(0, low_open=True), default=1e-2, help="attention-transfer learning rate"
    )
    p.add_argument(
        "--score-weight",
        type=float_in(0),
        default=0.0,
        help="attention transfer: weight of Hedgehog's attention-score loss added to the output MSE "
        "(t2r / hedgehog / linear without --hybrid)",
    )
    p.add_argument(
        "--feature-dim", type=int_at_least(1), default=None, help="t2r / hedgehog feature size (default: the method's)"
    )
    p.add_argument("--lora-rank", type=int_at_least(1), default=8, help="LoRA rank (--finetune lora)")
    p.add_argument("--hybrid", action="store_true", help="t2r / hedgehog: LoLCATs sliding-window hybrid (softmax over the last --window tokens)")
    p.add_argument("--window", type=int_at_least(1), default=64, help="hybrid softmax window")
    p.add_argument(
        "--window-init",
        type=float_in(-float("inf")),
        default=0.0,
        help="hybrid: starting logit of the window's share (0: 1/2)",
    )
    p.add_argument(
        "--num-key-value-heads", type=int_at_least(1), default=None, help="K/V heads after pooling (required by --method gqa; no default)"
    )
    p.add_argument(
        "--val-fraction",
        type=float_in(0, 1, low_open=True),
        default=0.1,
        help="the last fraction of the text, held out for validation perplexity",
    )
    p.add_argument(
        "--max-val-chars",
        type=int_at_least(1),
        default=None,
        help="evaluate on at most this much held-out text (default: all of it)",
    )
    p.add_argument(
        "--save-steps",
        type=int_at_least(0),
        default=0,
        help="safetensors checkpoints every N steps (in DIR/checkpoints; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the uptraining")
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
    if args.method == "gqa" and args.num_key_value_heads is None:
        raise ValueError("--method gqa needs --num-key-value-heads (the K/V heads after pooling)")
    return options


def earlier_output(out: pathlib.Path) -> dict | None:
    """The `fastattn_conversion` entry of the model saved in `out`, if `out` holds an output of this command."""
    from .core import CONVERSION_KEY
    from .families import CONVERTED_PREFIX

    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if CONVERSION_KEY in config or str(config.get("model_type", "")).startswith(CONVERTED_PREFIX):
        return config.get(CONVERSION_KEY) or {}
    return None


def check_out(args, src: str) -> tuple[pathlib.Path, str | None]:
    """(--out as an absolute path, a note to print or None); raises ValueError if writing there is refused."""
    out = check_output_dir(args.out)
    if os.path.isdir(src):
        source = pathlib.Path(src).resolve()
        if out.resolve() == source:
            raise ValueError("--out must differ from SRC (SRC is never modified)")
        if source in out.resolve().parents:
            raise ValueError(f"--out {args.out!r} lies inside SRC; SRC is never modified: choose a folder elsewhere")
    if not out.is_dir() or not any(out.iterdir()):
        return out, None
    earlier = earlier_output(out)
    if earlier is not None:
        method = earlier.get("method", "?")
        return out, f"--out {str(out)!r} holds an earlier conversion (method {method!r}); it will be replaced"
    if args.overwrite:
        return out, f"--overwrite: writing into the non-empty folder {str(out)!r}"
    entries = sorted(p.name for p in out.iterdir())
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(
        f"--out {args.out!r} is a non-empty folder ({len(entries)} entries: {shown}) that holds no earlier output "
        "of hf-fastattn convert; choose a new or empty folder, or pass --overwrite to write into it anyway"
    )


def read_text(args) -> str:
    """The text of --train-file or --dataset, refused if missing or empty."""
    from .distill import load_text

    if args.dataset:
        text = load_text(args.dataset)
        if not text.strip():
            raise ValueError(f"--dataset {args.dataset!r} has no text")
        return text
    path = os.path.expanduser(args.train_file)
    if os.path.isdir(path):
        raise ValueError(f"--train-file {args.train_file!r} is a folder; give a text file (or --dataset FOLDER)")
    if not os.path.isfile(path):
        raise ValueError(f"--train-file {args.train_file!r}: no such file")
    try:
        text = load_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"--train-file {args.train_file!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise ValueError(f"--train-file {args.train_file!r} is empty")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        return fail(parser.prog, e)


def run(args) -> int:
    from .core import convert, method_config
    from .distill import UptrainConfig, lm_dataset, perplexity, split_text, uptrain
    from .families import FAMILIES, base_model_type, family_of, head_counts

    main_process = int(os.environ.get("RANK", "0")) == 0
    say = print if main_process else (lambda *a, **k: None)

    # 1. the arguments, the paths and the text, before anything is loaded
    options = method_options(args)
    method_config(args.method, **options)
    src, gguf = resolve_model(args.src, "SRC", fetch=False)  # a short name is fetched after the text is read
    out, note = check_out(args, os.path.join(src, gguf) if gguf else src)
    finetune = args.finetune or DEFAULT_FINETUNE[args.method]
    transfer = (
        args.transfer_steps
        if args.transfer_steps is not None
        else (args.max_steps if args.method == "hedgehog" else 0)
    )
    cfg = UptrainConfig(
        transfer_steps=transfer,
        transfer_lr=args.transfer_lr,
        transfer_score_weight=args.score_weight,
        finetune=finetune,
        finetune_steps=args.max_steps,
        finetune_lr=args.lr or (1e-3 if finetune == "lora" else 3e-4),
        lora_rank=args.lora_rank,
        batch_size=args.batch_size,
        seed=args.seed,
        save_steps=args.save_steps,
    )
    text = read_text(args)
    train_text, val_text = split_text(text, args.val_fraction)
    if args.max_val_chars:
        val_text = val_text[: args.max_val_chars]
    source = f"--dataset {args.dataset!r}" if args.dataset else f"--train-file {args.train_file!r}"
    if not val_text.strip():
        raise ValueError(f"{source}: --val-fraction {args.val_fraction} of {len(text)} characters leaves no validation text")
    if note:
        say(note)

    # 2. the tokenizer (cheap): is there a training block and something to validate on?
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src, gguf = resolve_model(args.src, "SRC")
    with model_load_errors(args.src, "SRC"):
        config = AutoConfig.from_pretrained(src, gguf_file=gguf)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    try:
        train = lm_dataset(train_text, tokenizer, args.seq_len)
    except ValueError as e:
        tokens = len(tokenizer(train_text, add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"{source}: its training part has {tokens} tokens, fewer than one block of --seq-len {args.seq_len}"
        ) from e
    family = FAMILIES.get(base_model_type(config))
    if family is None:
        raise ValueError(
            f"SRC {args.src!r} is a {base_model_type(config)!r} model; hf-fastattn convert supports {sorted(FAMILIES)}"
        )
    if family.name in ("gpt2", "bert"):  # learned position embeddings: no position beyond the table
        positions = getattr(config, "n_positions", None) or config.max_position_embeddings
        if args.seq_len > positions:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the {positions} positions of SRC ({family.name})")
    if args.method == "gqa":  # the one option that depends on the model's shape
        hkv = head_counts(config, family)[1]
        if hkv % args.num_key_value_heads:
            raise ValueError(
                f"--num-key-value-heads {args.num_key_value_heads} must divide the {hkv} key/value heads of SRC "
                f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
            )
    causal = family.causal
    if causal and len(tokenizer(val_text, add_special_tokens=False)["input_ids"]) < 2:
        raise ValueError(f"{source}: the validation text (--val-fraction, --max-val-chars) has fewer than 2 tokens")

    # 3. the model: convert first (it refuses unsupported models and options that need the model's shape)
    auto_class = AutoModelForCausalLM if causal else AutoModel
    with model_load_errors(args.src, "SRC"):
        if gguf:  # dequantized into a plain model (a GGUF-quantized one refuses save_pretrained)
            from ..pretrained import load_gguf

            model = load_gguf(os.path.join(src, gguf), auto_class)[0]
        else:
            model = auto_class.from_pretrained(src)
    family = family_of(model)
    converted = convert(model, args.method, **options)
    if not family.causal and args.max_steps and finetune != "none":
        say(
            "encoder: stage 2 (masked-LM fine-tuning) needs a masked-LM head; running attention transfer only"
        )
        cfg = dataclasses.replace(cfg, finetune="none")
    before = perplexity(model, tokenizer, val_text, args.seq_len) if family.causal else None
    if before is not None:
        say(f"validation perplexity before conversion: {before:.3f}")
    del model
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = str(out / "checkpoints") if args.save_steps else tmp
        converted = uptrain(converted, train, dataclasses.replace(cfg, output_dir=output_dir))
    if family.causal:
        after = perplexity(converted, tokenizer, val_text, args.seq_len)
        say(
            f"validation perplexity after conversion ({args.method}): {after:.3f} ({after / before:.3f}x the original)"
        )
    if main_process:
        converted.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if not (out / "config.json").is_file():  # transformers only logs an error when it cannot save
            print(f"hf-fastattn convert: error: nothing was saved to {out}", file=sys.stderr)
            return 1
        say(f"saved to {out}")
    return 0
