"""`hf-fastattn convert SRC --method M (--train-file TEXT | --dataset NAME) --max-tokens N --out DIR`.

Loads SRC (a local directory or a hub id; never modified), converts it and uptrains it with the method's default
recipe (`hf_fastattn.conversion.recipes.RECIPES`, the tuned recipes of `hf-fastattn bench conversion`; `--recipe NAME`
picks another) on a budget of `--max-tokens` training tokens, every stage counted, split between the stages by the
recipe. Each flag given explicitly (--lr, --batch-size, --finetune, --window, --seq-len, ...) replaces the recipe's
value; every effective setting is printed at the start, with where it came from, and saved beside the weights
(`fastattn_recipe.json`). The original model stays in memory as the teacher of layer transfer and distillation.
Prints the validation perplexity (the last `--val-fraction` of the text) before and after, and saves model and
tokenizer to DIR. Runs under `accelerate launch` too (only the main process prints and saves).

Every argument is checked before the model is loaded (and the text before the model's weights): a bad one costs
seconds, not the hours of an uptraining whose result cannot be saved. DIR must be missing, empty or an earlier output
of this command; `--overwrite` writes into any other folder (files of the same names are replaced).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

from ..cli import fail
from ..loading import check_output_dir, model_load_errors, resolve_model
from .cli_args import (  # noqa: F401  (re-exported: the parser and the plan lived here before 0.2)
    OPTION_FLAGS,
    RECIPE_DEFAULT,
    RECIPE_FLAGS,
    build_parser,
    make_cli_plan,
    method_of,
    recipe_overrides,
    token_count,
)

# the file beside the weights that records the effective settings of the run
RECIPE_FILE = "fastattn_recipe.json"


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
            raise ValueError(
                f"--out {args.out!r} lies inside SRC; SRC is never modified: choose a folder elsewhere"
            )
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
        raise ValueError(
            f"--train-file {args.train_file!r} is a folder; give a text file (or --dataset FOLDER)"
        )
    if not os.path.isfile(path):
        raise ValueError(f"--train-file {args.train_file!r}: no such file")
    try:
        text = load_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--train-file {args.train_file!r} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from e
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
    from .distill import lm_dataset, perplexity, split_text
    from .families import family_of, head_counts, learned_position_limit
    from .recipes import activation_width, context_length
    from .runner import run_plan

    main_process = int(os.environ.get("RANK", "0")) == 0
    say = print if main_process else (lambda *a, **k: None)

    # 1. the arguments, the recipe, the paths and the text, before anything is loaded
    method = method_of(args)
    plan = make_cli_plan(args, method)
    src, gguf = resolve_model(args.src, "SRC", fetch=False)  # a short name is fetched after the text is read
    out, note = check_out(args, os.path.join(src, gguf) if gguf else src)
    text = read_text(args)
    train_text, val_text = split_text(text, args.val_fraction)
    if args.max_val_chars:
        val_text = val_text[: args.max_val_chars]
    source = f"--dataset {args.dataset!r}" if args.dataset else f"--train-file {args.train_file!r}"
    if not val_text.strip():
        raise ValueError(
            f"{source}: --val-fraction {args.val_fraction} of {len(text)} characters leaves no validation text"
        )
    if note:
        say(note)

    # 2. the config and tokenizer (cheap): the model's family, a training block, something to validate on
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src, gguf = resolve_model(args.src, "SRC")
    with model_load_errors(args.src, "SRC"):
        config = AutoConfig.from_pretrained(src, gguf_file=gguf)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    try:  # the compatibility rule's verdict on SRC's own config (a model built on the meta device), with its reason
        family = family_of(config)
    except ValueError as e:
        raise ValueError(f"SRC {args.src!r}: {e}") from e
    causal = family.causal
    # the plan again, knowing the model: an encoder's drops what needs a causal LM (stage 2, the hybrid), saying so;
    # the recipe's default block length is the model's context (at most recipes.MAX_SEQ_LEN)
    plan = make_cli_plan(
        args, method, causal=causal, context=context_length(config), width=activation_width(config)
    )
    seq_len = plan.recipe.seq_len
    seq_len_flag = f"--seq-len {seq_len}" + ("" if args.seq_len else f" ({plan.source('seq_len')})")
    try:
        train = lm_dataset(train_text, tokenizer, seq_len)
    except ValueError as e:
        tokens = len(tokenizer(train_text, add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"{source}: its training part has {tokens} tokens, fewer than one block of {seq_len_flag}"
        ) from e
    positions = learned_position_limit(config)  # a learned absolute position table: no position beyond it
    if positions is not None and seq_len > positions:
        raise ValueError(
            f"{seq_len_flag} exceeds the {positions} positions of SRC ({family.name}), whose learned absolute "
            f"position table has no position beyond them; use --seq-len {positions} or less"
        )
    if plan.method == "gqa":  # the one option that depends on the model's shape
        hkv, groups = head_counts(config, family)[1], plan.options.get("num_key_value_heads")
        if groups is None or hkv % groups:
            given = "" if args.num_key_value_heads else f" ({plan.source('num_key_value_heads')})"
            raise ValueError(
                f"--num-key-value-heads {groups}{given} must divide the {hkv} key/value heads of SRC "
                f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
            )
    if causal and len(tokenizer(val_text, add_special_tokens=False)["input_ids"]) < 2:
        raise ValueError(
            f"{source}: the validation text (--val-fraction, --max-val-chars) has fewer than 2 tokens"
        )
    for line in plan.describe():
        say(line)
    available = len(train) * seq_len
    if plan.tokens > available:
        say(
            f"the budget of {plan.tokens} tokens is {plan.tokens / available:.1f} passes over the {available} "
            "training tokens"
        )

    # 3. the model: convert first (it refuses unsupported models and options that need the model's shape); the
    # original stays in memory, the teacher of layer transfer and distillation (it is never written to disk)
    auto_class = AutoModelForCausalLM if causal else AutoModel
    with model_load_errors(args.src, "SRC"):
        if gguf:  # dequantized into a plain model (a GGUF-quantized one refuses save_pretrained)
            from ..pretrained import load_gguf

            model = load_gguf(os.path.join(src, gguf), auto_class)[0]
        else:
            model = auto_class.from_pretrained(src)
    model.eval()
    family_of(model)
    before = perplexity(model, tokenizer, val_text, seq_len) if causal else None
    if before is not None:
        say(f"validation perplexity before conversion: {before:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = str(out / "checkpoints") if args.save_steps else tmp
        converted = run_plan(model, plan, train, output_dir, seed=args.seed, save_steps=args.save_steps)
    del model
    if causal:
        after = perplexity(converted, tokenizer, val_text, seq_len)
        say(
            f"validation perplexity after conversion ({plan.method}): {after:.3f} ({after / before:.3f}x the original)"
        )
    if main_process:
        converted.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if not (out / "config.json").is_file():  # transformers only logs an error when it cannot save
            print(f"hf-fastattn convert: error: nothing was saved to {out}", file=sys.stderr)
            return 1
        record = {**plan.settings(), "src": args.src, "train": source, "seq_len_validation": seq_len}
        if causal:
            record.update(perplexity_before=before, perplexity_after=after)
        (out / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        say(f"saved to {out} (the settings in {RECIPE_FILE})")
    return 0
