"""The command line of `hf-fastattn convert`: its parser (every flag, typed and checked by argparse) and how the
flags given become a recipe plan (`make_cli_plan`: the recipe, each flag's override and where it came from). The run
itself is `conversion.cli`."""

from __future__ import annotations

import argparse
import os

from ..cli import ArgumentParser, float_in, int_at_least

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
    "bf16": ("bf16", "--bf16"),
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
        f"(t2r / hedgehog / linear without the hybrid; mqa / gqa in layer transfer) ({RECIPE_DEFAULT})",
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
        "one more forward per step) (default: on where a stage-2 step's tokens x hidden size x layers reach 40M, e.g. "
        "a 135M model at two 2048-token blocks per step or a 1B model at one; the plan prints the reason)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 mixed precision (float32 weights and optimizer, bfloat16 matrix products) in both stages "
        f"({RECIPE_DEFAULT}: mqa / gqa on where the CPU or GPU computes bfloat16 natively)",
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
        choices=["mean", "svd", "calibrated"],
        default=None,
        help="mqa / gqa: K/V mean pooling, the circuit-preserving fit, or that fit weighted by the statistics of the "
        f"model's inputs on the first blocks of --train-file ({RECIPE_DEFAULT})",
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
    from .recipes import SOFTMAX_STUDENT_METHODS

    ignored = [
        flag
        for dest, (_, flag, methods) in OPTION_FLAGS.items()
        if getattr(args, dest) is not None and method not in methods
    ]
    if args.score_weight and method not in ("t2r", "hedgehog", "linear", *SOFTMAX_STUDENT_METHODS):
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
    if args.bf16 is False:
        sources["bf16"] = "--no-bf16"
    if options:
        overrides["options"] = options
    return overrides, sources


def make_cli_plan(args, method: str, causal: bool = True, context: int | None = None, width: int | None = None):
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
        width=width,
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
