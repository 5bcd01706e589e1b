"""Activation (gradient) checkpointing in uptraining (issue 16, long sequences): every stage gives the same gradients
with and without it, the backward really recomputes the layers, and `uptrain(gradient_checkpointing=True)` trains
to the same weights. Stage 1 stores per-module losses from the attention function / forward hooks: the recomputed
forward must run them again (same attention function, hooks, targets) without storing a second copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny_model
from transformers import TrainingArguments

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.data import lm_dataset
from hf_fastattn.conversion.families import attention_modules, family_of
from hf_fastattn.conversion.losses import attention_transfer_loss, layer_transfer_loss, stage1_step
from hf_fastattn.conversion.trainers import DistillationTrainer, distillation_kl
from hf_fastattn.conversion.uptraining import (
    UptrainConfig,
    activation_checkpointing,
    add_lora,
    set_trainable,
    uptrain,
)

N = 32


def _batch():
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    return {"input_ids": random_ids(n=N), "attention_mask": mask}


def _grads(model, step, checkpointing: bool, input_grads: bool):
    """{name: grad} after one forward and backward of `step()` (a context manager factory and a loss function),
    and how many times the first attention module ran (2 with checkpointing: the backward recomputes it)."""
    model.train()
    model.zero_grad(set_to_none=True)
    # the same dropout masks in both runs (checkpointing replays the RNG in the recompute)
    torch.manual_seed(0)
    calls = []
    first = attention_modules(model, family_of(model))[0]
    handle = first.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with activation_checkpointing(model, checkpointing, input_grads=input_grads):
            step()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, len(calls)


def _assert_same(plain, ckpt):
    (a, runs_a), (b, runs_b) = plain, ckpt
    assert runs_a == 1 and runs_b == 2, (runs_a, runs_b)  # the checkpointed backward recomputed the layer
    assert a and a.keys() == b.keys()
    assert any(g.abs().max() > 0 for g in a.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


STAGE1 = {
    # (family, method, options, mode, score weight)
    "attention-hedgehog-hybrid": ("llama", "hedgehog", {"hybrid": True, "window": 8}, "attention", 0.0),
    "attention-t2r-score": ("llama", "t2r", {"feature_dim": 16}, "attention", 1.0),
    "layer-t2r-score": ("llama", "t2r", {"feature_dim": 16}, "layer", 1.0),
    "layer-mqa": ("llama", "mqa", {}, "layer", 0.0),
    "layer-mqa-score": ("llama", "mqa", {}, "layer", 1.0),
    # an encoder, with dropout (the recompute replays the forward's masks)
    "attention-bert-hedgehog": ("bert", "hedgehog", {}, "attention", 0.0),
    "layer-bert-hedgehog": ("bert", "hedgehog", {}, "layer", 0.0),
}


@pytest.mark.parametrize("case", list(STAGE1))
def test_stage1_gradients_equal_with_checkpointing(case):
    family, method, options, mode, score = STAGE1[case]
    teacher = tiny_model(family, initializer_range=0.2)
    model = convert(teacher, method, **options)
    set_trainable(model, "attention_transfer" if mode == "attention" else "attention")
    batch = _batch()
    implementation = model.config._attn_implementation

    def step():
        if mode == "attention":
            with stage1_step(model, score_weight=score):
                attention_transfer_loss(model, batch, score).backward()
        else:
            with stage1_step(model, teacher, score):
                layer_transfer_loss(model, teacher, batch, score).backward()

    _assert_same(_grads(model, step, False, False), _grads(model, step, True, False))
    # nothing of the step is left on the modules or the model
    for m in attention_modules(model, family_of(model)):
        assert not [
            k for k in m.__dict__ if k.startswith(("fastattn_", "_fastattn_score", "_fastattn_token"))
        ]
    assert "_fastattn_layer_transfer" not in model.__dict__
    assert model.config._attn_implementation == implementation


def test_stage1_backward_outside_the_step_state_fails_loudly():
    """Without `stage1_step` held over the backward, the recomputation runs another attention function: torch's
    checkpoint refuses (an error, not silently different gradients)."""
    teacher = tiny_model("llama", initializer_range=0.2)
    model = convert(teacher, "hedgehog", hybrid=True, window=8).train()
    set_trainable(model, "attention_transfer")
    with activation_checkpointing(model, input_grads=False):
        loss = attention_transfer_loss(model, _batch())
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            loss.backward()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_stage2_gradients_equal_with_checkpointing(tmp_path, finetune):
    """Stage 2 with distillation (logits; hidden states too for full), through LoRA adapters or all weights."""
    teacher = tiny_model("llama", initializer_range=0.2)
    model = convert(teacher, "hedgehog", hybrid=True, window=8)
    if finetune == "lora":
        model = add_lora(model, rank=4)
        # LoRA's B starts at zero (A then gets no gradient): give it a value so every adapter weight is checked
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    else:
        set_trainable(model, "full")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillationTrainer(
        model=model,
        args=args,
        teacher=teacher,
        distill_weight=0.5,
        hidden_weight=1.0 if finetune == "full" else 0,
    )
    batch = {**_batch(), "labels": random_ids(n=N)}

    def step():
        trainer.compute_loss(model, dict(batch)).backward()

    _assert_same(_grads(model, step, False, True), _grads(model, step, True, True))


@pytest.mark.parametrize("recipe", ["attention-then-lora", "layer-then-full"])
def test_uptrain_weights_equal_with_checkpointing(tmp_path, text, tokenizer, recipe, monkeypatch):
    """A few steps of both stages through `uptrain` (the Trainers): the same weights with checkpointing (both
    stages, or "finetune": stage 2 only), and the returned model has it switched off again (no checkpointed layers, no
    input-gradient hook)."""
    import hf_fastattn.conversion.uptraining as uptraining

    switched = []
    real = uptraining.activation_checkpointing

    def spy(model, enabled, **kwargs):
        switched.append(enabled)
        return real(model, enabled, **kwargs)

    monkeypatch.setattr(uptraining, "activation_checkpointing", spy)
    teacher = tiny_model("llama", initializer_range=0.2)
    data = lm_dataset(text[:20_000], tokenizer, N, max_blocks=16)
    if recipe == "attention-then-lora":
        method, options = "hedgehog", {"hybrid": True, "window": 8}
        stages = dict(transfer_mode="attention", finetune="lora", distill_weight=1.0)
    else:
        method, options = "t2r", {"feature_dim": 16}
        stages = dict(
            transfer_mode="layer",
            finetune="full",
            distill_weight=1.0,
            distill_hidden_weight=1.0,
            transfer_score_weight=1.0,
        )
    trained = []
    for checkpointing in (False, True, "finetune"):
        switched.clear()
        cfg = UptrainConfig(
            transfer_steps=3,
            finetune_steps=3,
            batch_size=2,
            finetune_lr=1e-2,
            output_dir=str(tmp_path),
            logging_steps=1,
            gradient_checkpointing=checkpointing,
            **stages,
        )
        torch.manual_seed(0)  # t2r's feature maps start random
        model = uptrain(convert(teacher, method, **options), data, cfg, teacher=teacher)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert not getattr(model, "_require_grads_hooks", None)
        assert switched == {False: [False, False], True: [True, True], "finetune": [False, True]}[checkpointing]
        trained.append(model.state_dict())
    plain, *checkpointed = trained
    original = teacher.state_dict()
    assert any(not torch.equal(plain[k], original[k]) for k in original)  # it trained
    for ckpt in checkpointed:
        assert plain.keys() == ckpt.keys()
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-5, msg=k)


def test_gradient_checkpointing_option_is_validated():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        UptrainConfig(gradient_checkpointing="yes")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_kl_in_checkpointed_pieces_equals_the_formula(temperature):
    """Stage 2's KL term computed a few positions at a time (each piece recomputed in the backward): the value and
    the gradient of the one-piece formula, padded positions excluded."""
    torch.manual_seed(0)
    student = torch.randn(2, 11, 50, requires_grad=True)
    teacher = torch.randn(2, 11, 50)
    teacher[0, 5, 7] = 300.0  # a teacher certain of one word: its other probabilities underflow to 0 (0 log 0 = 0)
    mask = torch.ones(2, 11)
    mask[1, :3] = 0
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="none"
    ).sum(-1) * (t * t)
    want = (kl * mask).sum()
    (want_grad,) = torch.autograd.grad(want, student)
    got = distillation_kl(student, teacher, mask, t, chunk=4)  # 22 positions: 6 pieces, the last partial
    (got_grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    assert got_grad[1, :3].abs().max() == 0
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
