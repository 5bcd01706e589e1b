"""The recipe runner: convert a model by a `recipes.RecipePlan` and uptrain it on a token budget (`run_plan`), and its
Python entry points (`convert_with_recipe`, the form of `hf-fastattn convert`; `convert_and_uptrain`, budgets in
steps). Above `convert()` and `recipes` (the registry and the plans), which never import it.
"""

from __future__ import annotations

from typing import Any

from .recipes import RecipePlan, activation_width, context_length, make_plan, recipe_seq_len

# tokens of the training data run through the original model for the statistics a calibrated init fits to ("mqa" /
# "gqa" init="calibrated"); not counted in the training budget (forward only, no update): on SmolLM2-135M 8 blocks of
# 2048 tokens, under a minute on 1 thread. What it buys there (3 -> 1 K/V heads, untrained, held-out perplexity at
# 512 / 2048 tokens against the original's 35.6 / 29.2): 120 / 99, where the weight-only fit gives 217,771 / 200,927
CALIBRATION_TOKENS = 16384


def calibration_blocks(dataset, tokens: int = CALIBRATION_TOKENS) -> list:
    """The first blocks of `dataset` (rows with "input_ids") holding about `tokens` tokens, at least one."""
    if dataset is None or len(dataset) == 0:
        raise ValueError("a calibrated init needs training data to measure the model's inputs on; none was given")
    block = len(dataset[0]["input_ids"])
    return [dataset[i] for i in range(min(len(dataset), max(1, -(-tokens // block))))]


def run_plan(
    teacher,
    plan: RecipePlan,
    dataset,
    output_dir: str = "fastattn-uptrain",
    *,
    seed: int = 0,
    save_steps: int = 0,
):
    """`convert` `teacher` by `plan` and `uptrain` it on `dataset` (blocks of `plan.recipe.seq_len` tokens); the
    converted model in eval mode. `teacher` is left untouched and stays in memory: it is the target of layer
    transfer and distillation. `seed` sets the new modules' initialization and the `Trainer`'s data order, so a
    run is reproducible whatever ran before it. `Trainer` output goes under `output_dir`."""
    import torch

    from .core import convert
    from .registry import method_config
    from .uptraining import uptrain

    calibrated = method_config(plan.method, **plan.options).needs_calibration()
    with torch.random.fork_rng(
        devices=[]
    ):  # new feature maps (t2r's) start from `seed`, the caller's RNG untouched
        torch.manual_seed(seed)
        data = calibration_blocks(dataset) if calibrated else None
        model = convert(teacher, plan.method, calibration_data=data, **plan.options)
    if not plan.transfer_steps and not plan.finetune_steps:
        return model.eval()
    block = len(dataset[0]["input_ids"])
    if block != plan.recipe.seq_len:
        raise ValueError(
            f"the dataset's blocks have {block} tokens; the plan's seq_len is {plan.recipe.seq_len}"
        )
    cfg = plan.uptrain_config(output_dir, seed=seed, save_steps=save_steps)
    return uptrain(model, dataset, cfg, teacher=teacher).eval()


def convert_with_recipe(
    teacher,
    method: str | None,
    dataset,
    max_tokens: int,
    *,
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
    output_dir: str = "fastattn-uptrain",
    seed: int = 0,
):
    """(converted model in eval mode, its `RecipePlan`): the Python form of `hf-fastattn convert`. Converts
    `teacher` (left untouched) with `recipe` (default: `method`'s default recipe) and uptrains it on `max_tokens`
    tokens of `dataset` (blocks of the recipe's `seq_len`, e.g. `distill.lm_dataset(text, tokenizer, 128)`),
    split between the stages by the recipe. `overrides` replace recipe settings (see `make_plan`)."""
    from .families import family_of

    causal = family_of(teacher).causal
    context = context_length(teacher.config)
    width = activation_width(teacher.config)
    plan = make_plan(method, recipe, max_tokens, overrides=overrides, causal=causal, context=context, width=width)
    return run_plan(teacher, plan, dataset, output_dir, seed=seed), plan


def convert_and_uptrain(teacher, method: str, dataset, steps: int, batch_size: int, output_dir: str):
    """(converted model in eval mode, steps trained): `RECIPES[method]` (a recipe name) on a budget of
    `steps * batch_size` blocks of `dataset`, the blocks' own length taking the place of the recipe's `seq_len`;
    the returned steps are counted in batches of `batch_size` (0 for a recipe that does not train), so
    `steps * batch_size * seq_len` stays the number of training tokens used. Kept for callers that count in steps;
    `convert_with_recipe` takes the budget in tokens."""
    seq_len = len(dataset[0]["input_ids"]) if dataset is not None else recipe_seq_len(method, teacher.config)
    plan = make_plan(
        recipe=method,
        max_tokens=steps * batch_size * seq_len,
        overrides={"seq_len": seq_len},
        width=activation_width(teacher.config),
    )
    model = run_plan(teacher, plan, dataset, output_dir)
    return model, -(-plan.tokens // (batch_size * seq_len))
