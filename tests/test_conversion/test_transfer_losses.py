"""The extra training signals of uptraining: Hedgehog's attention-score loss (stage 1, `transfer_score_weight`) and
hidden-state distillation (stage 2, `distill_hidden_weight`), each checked against a computation written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids as _ids
from conftest import tiny_model
from transformers import TrainingArguments

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.distill import (
    DistillationTrainer,
    UptrainConfig,
    attention_score_loss,
    attention_transfer_loss,
    layer_transfer_loss,
    lm_dataset,
    set_trainable,
    uptrain,
)
from hf_fastattn.conversion.families import attention_modules, family_of


def _loop_score_loss(fmap, q, k, keep, scaling, causal):
    """Cross-entropy of the linear weights against softmax's, one query at a time (`keep`: real tokens)."""
    b, h, n, _ = q.shape
    total, count = 0.0, 0
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                if not keep[bi, i]:
                    continue
                keys = [j for j in range(n) if keep[bi, j] and (j <= i or not causal)]
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] * scaling for j in keys])
                target = logits.softmax(0)
                phi_q = fmap(q[bi : bi + 1, :, i : i + 1])[0, hi, 0]
                w = torch.stack([phi_q @ fmap(k[bi : bi + 1, :, j : j + 1])[0, hi, 0] for j in keys])
                # normalized weights below 1e-6 (ReLU features can give 0) count as 1e-6, as in the loss
                log_w = (w / w.sum().clamp_min(1e-6)).clamp_min(1e-6).log()
                total += -(target * log_w).sum().item() / h
                count += 1 / h
    return total / count


@pytest.mark.parametrize("family,method", [("llama", "t2r"), ("llama", "hedgehog"), ("bert", "t2r")])
def test_attention_score_loss_matches_a_loop_and_skips_padding(family, method):
    torch.manual_seed(0)
    model = convert(tiny_model(family), method, **({"feature_dim": 8} if method == "t2r" else {}))
    module = attention_modules(model, family_of(model))[0]
    b, h, n, d = 2, 4, 7, 16
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, :3] = False  # left padding: neither a query nor a key
    causal = family != "bert"
    got = attention_score_loss(module, q, k, keep, scaling=0.25, causal=causal)
    want = _loop_score_loss(module.fastattn_feature_map, q, k, keep, 0.25, causal)
    assert math.isclose(got.item(), want, rel_tol=1e-5), (got.item(), want)
    # the padded row scores as its real tokens alone
    alone = attention_score_loss(module, q[1:, :, 3:], k[1:, :, 3:], None, scaling=0.25, causal=causal)
    assert math.isclose(alone.item(), _loop_score_loss(module.fastattn_feature_map, q[1:, :, 3:], k[1:, :, 3:],
                                                       keep[1:, 3:], 0.25, causal), rel_tol=1e-5)


def test_attention_score_loss_groups_kv_heads_and_is_bounded_by_the_entropy():
    torch.manual_seed(0)
    model = convert(tiny_model("llama", num_key_value_heads=2), "t2r", feature_dim=8)
    module = attention_modules(model, family_of(model))[0]
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    got = attention_score_loss(module, q, k, None, scaling=0.25, causal=True)
    kk = k.repeat_interleave(2, dim=1)
    want = _loop_score_loss(module.fastattn_feature_map, q, kk, torch.ones(1, 6, dtype=torch.bool), 0.25, True)
    assert math.isclose(got.item(), want, rel_tol=1e-5)
    # cross-entropy >= the softmax weights' own entropy
    logits = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    assert got.item() > entropy.item()


@pytest.mark.parametrize("mode", ["attention", "layer"])
def test_stage1_score_loss_adds_to_the_output_loss_and_trains_down(mode):
    torch.manual_seed(0)
    teacher = tiny_model("llama", initializer_range=0.2)
    model = convert(teacher, "t2r", feature_dim=16)
    batch = {"input_ids": _ids(n=32, batch=4), "attention_mask": torch.ones(4, 32, dtype=torch.long)}

    def loss(weight):
        if mode == "attention":
            return attention_transfer_loss(model, batch, weight)
        return layer_transfer_loss(model, teacher, batch, weight)

    with torch.no_grad():
        plain, scored = loss(0.0).item(), loss(1.0).item()
        doubled = loss(2.0).item()
    score = scored - plain
    assert score > 0.1 and math.isclose(doubled - plain, 2 * score, rel_tol=1e-4)
    # the flags and stored losses are gone afterwards, and a plain forward is plain linear attention again
    assert all(not hasattr(m, "fastattn_score_loss") for m in attention_modules(model, family_of(model)))
    assert model.config._attn_implementation == "linear"
    params = [model.get_parameter(n) for n in set_trainable(model, "attention" if mode == "layer" else
                                                             "attention_transfer")]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(12):
        value = loss(1.0)
        opt.zero_grad()
        value.backward()
        opt.step()
        first = value.item() if first is None else first
    assert value.item() < 0.9 * first


def test_hidden_distillation_loss_is_the_kl_plus_the_layers_normalized_mse(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_model("llama", initializer_range=0.2)
    student = convert(teacher, "t2r", feature_dim=16)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    inputs = {"input_ids": _ids(n=20), "attention_mask": mask}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, distill_weight=1.0, hidden_weight=3.0)
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(inputs)).item()
        s = student(**inputs, output_hidden_states=True)
        t = teacher(**inputs, output_hidden_states=True)
    m = mask.bool()
    kl = F.kl_div(F.log_softmax(s.logits[m], -1), F.log_softmax(t.logits[m], -1), log_target=True,
                  reduction="batchmean")
    layers = [((a[m] - b[m]) ** 2).sum() / (b[m] ** 2).sum() for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])]
    assert len(layers) == teacher.config.num_hidden_layers
    want = kl + 3.0 * torch.stack(layers).mean()
    assert math.isclose(got, want.item(), rel_tol=1e-5), (got, want.item())


def test_uptrain_with_both_signals_and_their_errors(tmp_path, text, tokenizer):
    teacher = tiny_model("llama", initializer_range=0.2)
    data = lm_dataset(text[:20_000], tokenizer, 32, max_blocks=32)
    cfg = UptrainConfig(
        transfer_steps=3, transfer_mode="layer", transfer_batch_size=2, finetune="full", finetune_steps=2,
        batch_size=2, distill_weight=1.0, distill_hidden_weight=10.0, transfer_score_weight=1.0,
        output_dir=str(tmp_path), logging_steps=1,
    )
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = uptrain(convert(teacher, "t2r", feature_dim=16), data, cfg, teacher=teacher)
    assert model.config._attn_implementation == "linear"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    for name in ("distill_hidden_weight", "transfer_score_weight"):
        for bad in (-1.0, math.inf, math.nan, True, "1"):
            with pytest.raises(ValueError, match=name):
                UptrainConfig(**{name: bad})
    # hidden-state distillation needs the teacher, even without logit distillation
    with pytest.raises(ValueError, match="teacher="):
        uptrain(convert(teacher, "t2r"), data, UptrainConfig(finetune="full", finetune_steps=1,
                                                             distill_hidden_weight=1.0, output_dir=str(tmp_path)))
    # the score loss compares plain linear attention's weights, or softmax's against the original's in layer
    # transfer (mqa: `test_softmax_score.py`): not the hybrid's, not MQA's without the original to compare with
    score = UptrainConfig(transfer_steps=1, transfer_mode="layer", finetune="none", transfer_score_weight=1.0,
                          output_dir=str(tmp_path))
    batch = {"input_ids": _ids()}
    hybrid = convert(teacher, "t2r", hybrid=True)
    with pytest.raises(ValueError, match="transfer_score_weight.*hybrid.*t2r"):
        uptrain(hybrid, data, score, teacher=teacher)
    with pytest.raises(ValueError, match="transfer_score_weight.*hybrid"):
        layer_transfer_loss(hybrid, teacher, batch, 1.0)
    with pytest.raises(ValueError, match="transfer_score_weight.*hybrid"):
        attention_transfer_loss(convert(teacher, "hedgehog", hybrid=True), batch, 1.0)
    with pytest.raises(ValueError, match="transfer_score_weight.*'sdpa' attention without the original's"):
        attention_transfer_loss(convert(teacher, "mqa"), batch, 1.0)
