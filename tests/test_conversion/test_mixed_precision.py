"""bfloat16 mixed precision in uptraining (`UptrainConfig.bf16`, the recipes' `bf16`, `--bf16`). The reuse of freed
memory during uptraining (`ops.memory.reuse_freed_memory`) is tested in `tests/test_ops/test_memory.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.data import lm_dataset
from hf_fastattn.conversion.recipes import RECIPES, make_plan
from hf_fastattn.conversion.uptraining import UptrainConfig, native_bf16, uptrain


def _dataset(tokenizer, text, n=32):
    return lm_dataset(text[:20_000], tokenizer, n)


def _class_forward_logits(model, ids):
    """The logits of `model`'s class forward (whatever wrapper its instance `forward` may carry)."""
    return type(model).forward(model, ids).logits


def _record_dtypes(model, out: list):
    """Record the output dtype of every nn.Linear of `model` into `out`; returns the hook handles."""
    return [
        m.register_forward_hook(lambda _m, _a, y: out.append(y.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]


@pytest.mark.parametrize("stage", ["layer transfer", "distillation", "both"])
@pytest.mark.parametrize("bf16", [True, False])
def test_each_stage_runs_student_and_teacher_in_the_precision_asked(stage, bf16, tokenizer, text, tmp_path):
    """With bf16, the student's and the teacher's matrix products run in bfloat16 (autocast) in both stages, also in
    stage 2 after a stage 1 ("both": the first stage's autocast taken off the model must be put back for the second);
    the weights stay float32 (mixed precision, not a cast model). Without, everything is float32."""
    teacher = tiny_model("llama", vocab_size=len(tokenizer))
    model = convert(teacher, "mqa")
    cfg = UptrainConfig(
        transfer_steps=0 if stage == "distillation" else 1,
        transfer_mode="layer",
        finetune="none" if stage == "layer transfer" else "full",
        finetune_steps=0 if stage == "layer transfer" else 1,
        distill_weight=1.0,
        batch_size=2,
        bf16=bf16,
        output_dir=str(tmp_path),
    )
    student_dtypes, teacher_dtypes = [], []
    handles = _record_dtypes(model, student_dtypes) + _record_dtypes(teacher, teacher_dtypes)
    try:
        uptrain(model, _dataset(tokenizer, text), cfg, teacher=teacher)
    finally:
        for h in handles:
            h.remove()
    expected = torch.bfloat16 if bf16 else torch.float32
    assert student_dtypes and teacher_dtypes
    assert set(student_dtypes) == {expected} and set(teacher_dtypes) == {expected}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    # the returned model computes in float32 again: accelerate's autocast wrapper is gone from its forward
    ids = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float32
        torch.testing.assert_close(model(ids).logits, _class_forward_logits(model, ids))


def test_bf16_training_follows_float32_training(tokenizer, text, tmp_path):
    """The same steps in bfloat16 mixed precision move the weights as float32 training does, within bfloat16's
    rounding: the two updates point the same way and have about the same size."""
    teacher = tiny_model("llama", vocab_size=len(tokenizer))
    data = _dataset(tokenizer, text)
    start = {n: p.detach().clone() for n, p in convert(teacher, "mqa").named_parameters()}
    updates = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = convert(teacher, "mqa")
        cfg = UptrainConfig(
            finetune="full", finetune_steps=4, finetune_lr=1e-3, distill_weight=1.0, batch_size=2, bf16=bf16,
            output_dir=str(tmp_path / str(bf16)),
        )
        uptrain(model, data, cfg, teacher=teacher)
        updates[bf16] = torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()])
    full, mixed = updates[False], updates[True]
    assert full.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(full, mixed, dim=0)
    assert cosine > 0.9, cosine
    assert 0.8 < mixed.norm() / full.norm() < 1.25


def test_mqa_and_gqa_recipes_take_bf16_where_the_hardware_has_it():
    """The mqa / gqa recipes leave bf16 to the machine (`native_bf16`), and the plan says so; the other recipes
    train in float32 unless asked; `--bf16` / `--no-bf16` (overrides) win and are named as the source."""
    on, why = native_bf16()
    for name in ("mqa", "gqa"):
        plan = make_plan(recipe=name, max_tokens=8192, context=256)
        assert RECIPES[name].bf16 is None
        assert plan.recipe.bf16 is on and plan.sources["bf16"] == why
        assert plan.uptrain_config().bf16 is on
    for name in ("hedgehog", "t2r", "linear"):
        plan = make_plan(recipe=name, max_tokens=8192, context=256)
        assert plan.recipe.bf16 is False and "bf16" not in plan.sources
    plan = make_plan(recipe="mqa", max_tokens=8192, context=256, overrides={"bf16": False}, sources={"bf16": "--no-bf16"})
    assert plan.recipe.bf16 is False and plan.sources["bf16"] == "--no-bf16"
    assert make_plan(recipe="hedgehog", max_tokens=8192, context=256, overrides={"bf16": True}).recipe.bf16 is True
    with pytest.raises(ValueError, match="recipe setting bf16 must be True, False or None"):
        make_plan(recipe="mqa", max_tokens=8192, overrides={"bf16": "yes"})
    with pytest.raises(ValueError, match="bf16 must be True or False"):
        UptrainConfig(bf16=None)


def test_native_bf16_reads_the_cpu_features(monkeypatch):
    """Off, and saying why, on a CPU without AVX512-BF16 or AMX; on, naming the feature, where one is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert native_bf16() == (False, "this CPU has no native bfloat16 (AVX512-BF16 or AMX): float32")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    on, why = native_bf16()
    assert on and "AMX" in why


def test_the_cli_flag_sets_bf16():
    from hf_fastattn.conversion import cli

    def plan_of(*argv):
        args = cli.build_parser().parse_args(["SRC", "--train-file", "t.txt", "--out", "o", "--max-tokens", "8k", *argv])
        return cli.make_cli_plan(args, cli.method_of(args), context=256)

    plan = plan_of("--method", "mqa", "--no-bf16")
    assert plan.recipe.bf16 is False and plan.sources["bf16"] == "--no-bf16"
    plan = plan_of("--method", "hedgehog", "--bf16")
    assert plan.recipe.bf16 is True and plan.sources["bf16"] == "--bf16"
    assert any(line.split()[:2] == ["bf16", "True"] for line in plan.describe())
