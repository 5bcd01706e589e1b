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

import argparse
import json
import os
import pathlib
import sys
import tempfile

from ..cli import ArgumentParser, fail, float_in, int_at_least
from ..loading import check_output_dir, model_load_errors, resolve_model

# the file beside the weights that records the effective settings of the run
RECIPE_FILE = "fastattn_recipe.json"
# argparse dest -> (recipe field, flag): each overrides the recipe's value when given
RECIPE_FLAGS = {
    "seq_len": ("seq_len", "--seq-len"),
    "batch_size": ("batch", "--batch-size"),
    "transfer_batch_size": ("transfer_batch", "--transfer-batch-size"),
    "lr": ("lr", "--lr"),
    "transfer_fraction": ("transfer", "--transfer-fraction"),
    "transfer_mode": ("transfer_mode", "--transfer-mode"),
    "transfer_lr": ("transfer_lr", "--transfer-lr"),
    "transfer_proj_lr": ("transfer_proj_lr", "--transfer-proj-lr"),
    "finetune": ("finetune", "--finetune"),
    "distill_weight": ("distill", "--distill-weight"),
    "hidden_weight": ("hidden", "--hidden-weight"),
    "score_weight": ("score", "--score-weight"),
    "warmup": ("warmup", "--warmup"),
    "lora_rank": ("lora_rank", "--lora-rank"),
    "gradient_checkpointing": ("gradient_checkpointing", "--gradient-checkpointing"),
}
# argparse dest -> (method option, flag, the methods that take it)
OPTION_FLAGS = {
    "feature_dim": ("feature_dim", "--feature-dim", ("t2r", "hedgehog")),
    "hybrid": ("hybrid", "--hybrid", ("t2r", "hedgehog")),
    "window": ("window", "--window", ("t2r", "hedgehog")),
    "window_init": ("window_init", "--window-init", ("t2r", "hedgehog")),
    "num_key_value_heads": ("num_key_value_heads", "--num-key-value-heads", ("gqa",)),
    "init": ("init", "--init", ("mqa", "gqa")),
}
RECIPE_DEFAULT = "default: the recipe's"


def token_count(text: str) -> int:
    """An argparse `type`: a number of tokens >= 0, optionally with a k / M / G suffix (200k = 200,000)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of tokens such as 200000 or 200k, got {text!r}"
        ) from None
    if not value >= 0 or value != value or value == float("inf") or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens >= 0, got {text!r}")
    return int(value)


def build_parser() -> ArgumentParser:
    from .core import CONVERSION_METHODS, get_method
    from .recipes import RECIPES

    get_method("t2r")  # registers the built-in methods
    p = ArgumentParser(
        prog="hf-fastattn convert",
        description="Convert SRC to fast attention, uptrain it on a text with the method's tuned recipe, print the "
        "validation perplexity before and after, and save model and tokenizer to --out. Every setting the recipe "
        "gives can be replaced by its flag; all of them are printed at the start and saved with the model. Every "
        "argument is checked before the model is loaded.",
    )
    p.add_argument("src", help="local model directory or hub id (not modified)")
    p.add_argument(
        "--method",
        default=None,
        help=f"one of {sorted(CONVERSION_METHODS)} (default: the --recipe's method; one of the two is required)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help=f"the recipe, one of {sorted(RECIPES)} (default: the one named after --method, its tuned default)",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--train-file", help="local UTF-8 text file (the last --val-fraction is held out)")
    data.add_argument("--dataset", help="a datasets name or local dataset directory with a 'text' column")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--max-tokens",
        type=token_count,
        help="the budget: training tokens over both stages (stage-1 transfer tokens too, as LoLCATs counts them), "
        "split between the stages by the recipe; e.g. 204800 or 200k. The primary budget",
    )
    budget.add_argument(
        "--max-steps",
        type=int_at_least(0),
        help="the budget in steps instead: stage-2 (fine-tuning) steps; stage 1 then gets --transfer-steps, or the "
        "recipe's share of the tokens",
    )
    p.add_argument(
        "--transfer-steps",
        type=int_at_least(0),
        default=None,
        help="with --max-steps: stage-1 (transfer) steps (default: the recipe's share of the tokens)",
    )
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
    p.add_argument(
        "--seq-len",
        type=int_at_least(2),
        default=None,
        help=f"tokens per training block and validation window ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help=f"stage-2 global batch size, and stage 1's unless --transfer-batch-size is given ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--transfer-batch-size",
        type=int_at_least(1),
        default=None,
        help=f"stage-1 global batch size ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--finetune",
        choices=["lora", "full", "attention", "none"],
        default=None,
        help=f"stage 2: LoRA, all weights, the attention modules only, or none ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=None,
        help=f"stage-2 learning rate ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--transfer-fraction",
        type=float_in(0, 1, high_open=False),
        default=None,
        help=f"with --max-tokens: the share of the tokens for stage 1 ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--transfer-mode",
        choices=["attention", "layer"],
        default=None,
        help="stage 1: attention transfer (the feature maps learn softmax attention's outputs; t2r / hedgehog) or "
        f"layer transfer (each attention module regressed onto the original's output; any method) ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--transfer-lr",
        type=float_in(0, low_open=True),
        default=None,
        help=f"stage-1 learning rate of the feature maps ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--transfer-proj-lr",
        type=float_in(0, low_open=True),
        default=None,
        help=f"layer transfer: learning rate of the attention projections ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--distill-weight",
        type=float_in(0, 1, high_open=False),
        default=None,
        help="stage 2: weight of the KL divergence to the original model's logits (1: distillation only, 0: the "
        f"LM loss) ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--hidden-weight",
        type=float_in(0),
        default=None,
        help=f"stage 2: weight of hidden-state distillation ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--score-weight",
        type=float_in(0),
        default=None,
        help="stage 1: weight of Hedgehog's attention-score loss added to the output MSE "
        f"(t2r / hedgehog / linear without the hybrid) ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--warmup",
        type=float_in(0, 1, high_open=False),
        default=None,
        help=f"warm-up of each stage, as a share of the stage-2 steps ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--lora-rank",
        type=int_at_least(1),
        default=None,
        help=f"LoRA rank (--finetune lora) ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each decoder layer in the backward instead of keeping its activations (less memory, about "
        "one more forward per step) (default: on for blocks of 1024 tokens or more)",
    )
    p.add_argument(
        "--feature-dim",
        type=int_at_least(1),
        default=None,
        help=f"t2r / hedgehog feature size ({RECIPE_DEFAULT}, else the method's)",
    )
    p.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="t2r / hedgehog: LoLCATs sliding-window hybrid (softmax over the last --window tokens); --no-hybrid: "
        f"linear attention only ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--window",
        type=int_at_least(1),
        default=None,
        help=f"hybrid softmax window in tokens ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--window-init",
        type=float_in(-float("inf")),
        default=None,
        help=f"hybrid: starting logit of the window's share (0: 1/2, 4: 0.98) ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--num-key-value-heads",
        type=int_at_least(1),
        default=None,
        help=f"gqa: K/V heads after pooling, a divisor of SRC's ({RECIPE_DEFAULT})",
    )
    p.add_argument(
        "--init",
        choices=["mean", "svd"],
        default=None,
        help=f"mqa / gqa: K/V mean pooling or the circuit-preserving fit ({RECIPE_DEFAULT})",
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


def method_of(args) -> str:
    """The conversion method: --method, else the --recipe's."""
    from .core import get_method
    from .recipes import get_recipe

    if args.method is None and args.recipe is None:
        raise ValueError("give --method (its default recipe is used) or --recipe NAME")
    method = args.method if args.method is not None else get_recipe(args.recipe).method
    get_method(method)  # an unknown method: the valid ones listed
    return method


def recipe_overrides(args, method: str) -> tuple[dict, dict]:
    """(overrides, sources) for `recipes.make_plan`: the recipe settings and method options given as flags."""
    ignored = [
        flag
        for dest, (_, flag, methods) in OPTION_FLAGS.items()
        if getattr(args, dest) is not None and method not in methods
    ]
    if args.score_weight and method not in ("t2r", "hedgehog", "linear"):
        ignored.append("--score-weight")
    if ignored:
        raise ValueError(f"option(s) {ignored} do not apply to method {method!r}")
    if args.transfer_steps is not None and args.max_steps is None:
        raise ValueError(
            "--transfer-steps goes with --max-steps; with --max-tokens the recipe splits the budget "
            "(--transfer-fraction sets stage 1's share)"
        )
    if args.transfer_fraction is not None and args.max_steps is not None:
        raise ValueError("--transfer-fraction splits --max-tokens; with --max-steps give --transfer-steps")
    overrides, sources, options = {}, {}, {}
    for dest, (field, flag) in RECIPE_FLAGS.items():
        if getattr(args, dest) is not None:
            overrides[field], sources[field] = getattr(args, dest), flag
    if args.batch_size is not None and args.transfer_batch_size is None:
        overrides["transfer_batch"], sources["transfer_batch"] = args.batch_size, "--batch-size"
    for dest, (option, flag, _) in OPTION_FLAGS.items():
        if getattr(args, dest) is not None:
            options[option], sources[option] = getattr(args, dest), flag
    if args.hybrid is False:
        sources["hybrid"] = "--no-hybrid"
    if args.gradient_checkpointing is False:
        sources["gradient_checkpointing"] = "--no-gradient-checkpointing"
    if options:
        overrides["options"] = options
    return overrides, sources


def make_cli_plan(args, method: str, causal: bool = True, context: int | None = None):
    """The `RecipePlan` of this command line: the recipe, the flags given, the budget; checks the combination."""
    from .core import method_config
    from .recipes import make_plan

    overrides, sources = recipe_overrides(args, method)
    plan = make_plan(
        method,
        args.recipe,
        args.max_tokens,
        steps=args.max_steps,
        transfer_steps=args.transfer_steps,
        overrides=overrides,
        sources=sources,
        causal=causal,
        context=context,
    )
    if plan.recipe.score and plan.options.get("hybrid"):
        raise ValueError(
            f"--score-weight compares plain linear attention's weights with softmax's; not with --hybrid (score "
            f"{plan.recipe.score} from {plan.source('score')}, hybrid from {plan.source('hybrid')}): pass "
            "--score-weight 0, --no-hybrid, or a hybrid recipe"
        )
    # under accelerate launch each batch is split over the processes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for field, flag in (("batch", "--batch-size"), ("transfer_batch", "--transfer-batch-size")):
        if getattr(plan.recipe, field) % world:
            raise ValueError(
                f"{flag} {getattr(plan.recipe, field)} ({plan.source(field)}) must be divisible by the {world} "
                f"processes; pass {flag} as a multiple of {world}"
            )
    method_config(plan.method, **plan.options)
    plan.uptrain_config()  # the training settings, checked
    return plan


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
    from .recipes import context_length
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
    plan = make_cli_plan(args, method, causal=causal, context=context_length(config))
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
