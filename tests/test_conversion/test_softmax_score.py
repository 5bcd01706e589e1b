"""Hedgehog's attention-score loss with a softmax student (K/V heads pooled by mqa / gqa) in layer transfer:
`softmax_score_loss` against a loop over queries, and the loss the stage-1 step stores against the attention weights
transformers' eager path returns for the original and the converted model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_ids, tiny_model

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.distill import attention_transfer_loss, layer_transfer_loss, set_trainable
from hf_fastattn.conversion.families import attention_modules, family_of
from hf_fastattn.conversion.losses import score_positions, softmax_score_loss
from hf_fastattn.conversion.recipes import make_plan


def _loop_kl(q, k, tq, tk, positions, keep, scaling, causal):
    """KL(teacher || student) of the softmax weights, one sampled query at a time (`keep`: real tokens)."""
    b, h = q.shape[:2]
    total, count = 0.0, 0
    for bi in range(b):
        for m, i in enumerate(positions.tolist()):
            if not keep[bi, i]:
                continue
            keys = [j for j in range(k.shape[2]) if keep[bi, j] and (j <= i or not causal)]
            for hi in range(h):
                ks = k[bi, hi * k.shape[1] // h, keys]  # the K/V head this query head reads
                kt = tk[bi, hi * tk.shape[1] // h, keys]
                p_s = (ks @ q[bi, hi, m] * scaling).softmax(0)
                p_t = (kt @ tq[bi, hi, m] * scaling).softmax(0)
                total += (p_t * (p_t.log() - p_s.log())).sum().item()
            count += h
    return total / count


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_score_loss_matches_a_loop_and_skips_padding(causal):
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 11, 8
    positions = score_positions(n, stride=3)
    assert positions.tolist() == [1, 4, 7, 10]  # every third query, ending at the last
    q, tq = torch.randn(b, h, len(positions), d), torch.randn(b, h, len(positions), d)
    k, tk = torch.randn(b, 1, n, d), torch.randn(b, 2, n, d)  # one student K/V head, two in the original
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, :5] = False  # left padding: neither a query nor a key
    got = softmax_score_loss(q, k, tq, tk, positions, keep.long(), scaling=0.3, causal=causal)
    want = _loop_kl(q, k, tq, tk, positions, keep, 0.3, causal)
    assert math.isclose(got.item(), want, rel_tol=1e-5), (got.item(), want)
    # the same weights score 0; the KL is not symmetric in its arguments
    same = softmax_score_loss(tq, tk, tq, tk, positions, keep.long(), scaling=0.3, causal=causal)
    assert abs(same.item()) < 1e-6
    swapped = softmax_score_loss(tq, tk, q, k, positions, keep.long(), scaling=0.3, causal=causal)
    assert not math.isclose(swapped.item(), got.item(), rel_tol=1e-3)


def test_softmax_score_loss_gradient_is_the_plain_formula():
    """The scoring is recomputed in the backward (checkpointed): its gradient must be that of the formula."""
    torch.manual_seed(0)
    positions = score_positions(9, stride=2)
    q = torch.randn(1, 2, len(positions), 4, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, requires_grad=True)
    tq, tk = torch.randn(1, 2, len(positions), 4), torch.randn(1, 2, 9, 4)
    softmax_score_loss(q, k, tq, tk, positions, scaling=0.5).backward()
    allowed = torch.arange(9)[None, :] <= positions[:, None]
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    log_s = (q2 @ k2.expand(1, 2, 9, 4).transpose(-1, -2) * 0.5).masked_fill(~allowed, -math.inf).log_softmax(-1)
    log_t = (tq @ tk.transpose(-1, -2) * 0.5).masked_fill(~allowed, -math.inf).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).nan_to_num(0.0).sum(-1).mean()  # masked keys: 0 * (-inf + inf)
    kl.backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def _eager_weights(model, batch):
    model = copy.deepcopy(model)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_layer_transfer_stores_the_kl_of_the_eager_weights_and_trains_it_down(implementation):
    torch.manual_seed(0)
    teacher = tiny_model("llama", initializer_range=0.2)
    student = convert(teacher, "mqa")
    teacher.config._attn_implementation = student.config._attn_implementation = implementation
    ids = random_ids(0, 2, 40)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    batch = {"input_ids": ids, "attention_mask": mask}
    modules = attention_modules(student, family_of(student))
    stored = []
    modules[0].register_forward_hook(lambda m, a, o: stored.append(m.__dict__.get("fastattn_score_loss")))
    with torch.no_grad():
        plain = layer_transfer_loss(student, teacher, batch, 0.0).item()
        scored = layer_transfer_loss(student, teacher, batch, 1.0).item()
        doubled = layer_transfer_loss(student, teacher, batch, 2.0).item()
    # the first layer sees the same embeddings in both models, so its weights are those of plain eager forwards
    n = ids.shape[1]
    positions = score_positions(n)
    t_w, s_w = _eager_weights(teacher, batch)[0], _eager_weights(student, batch)[0]
    keep = mask.bool()
    kl = (t_w * (t_w.clamp_min(1e-30).log() - s_w.clamp_min(1e-30).log())).sum(-1)[:, :, positions]  # [B, H, M]
    real = keep[:, positions][:, None, :].float()
    want = (kl * real).sum() / (real.sum() * kl.shape[1])
    assert stored[1] is not None and math.isclose(stored[1].item(), want.item(), rel_tol=1e-4)
    score = scored - plain
    assert score > 1e-3 and math.isclose(doubled - plain, 2 * score, rel_tol=1e-4)
    # the wrappers are gone afterwards: both models run their own attention again, nothing is left on the modules
    assert student.config._attn_implementation == teacher.config._attn_implementation == implementation
    for m in modules + attention_modules(teacher, family_of(teacher)):
        assert not [k for k in m.__dict__ if "fastattn" in k]
    params = [student.get_parameter(name) for name in set_trainable(student, "attention")]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(15):
        with torch.no_grad():
            before = layer_transfer_loss(student, teacher, batch, 1.0).item() - layer_transfer_loss(
                student, teacher, batch, 0.0
            ).item()
        first = before if first is None else first
        opt.zero_grad()
        layer_transfer_loss(student, teacher, batch, 1.0).backward()
        opt.step()
    assert before < 0.7 * first


def test_softmax_score_needs_layer_transfer_and_sdpa_or_eager():
    teacher = tiny_model("llama")
    student = convert(teacher, "mqa")
    batch = {"input_ids": random_ids(0, 1, 8)}
    with pytest.raises(ValueError, match="without the original's attention to compare with"):
        attention_transfer_loss(student, batch, 1.0)
    other = copy.deepcopy(teacher)
    other.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="an original on 'flex_attention' attention.*'sdpa' or 'eager'"):
        layer_transfer_loss(student, other, batch, 1.0)


def test_softmax_score_does_not_force_activation_checkpointing():
    """Hedgehog's score loss on linear attention keeps N x N weights per layer for the backward, so it turns
    checkpointing on from 1024-token blocks; the softmax student's is strided and recomputed, so it does not."""
    width = 576 * 30
    mqa = make_plan(recipe="mqa", max_tokens=500_000, overrides={"score": 1.0}, context=8192, width=width)
    assert mqa.recipe.gradient_checkpointing is False
    t2r = make_plan(recipe="t2r", max_tokens=500_000, overrides={"score": 1.0, "transfer_batch": 1}, context=8192,
                    width=width)
    assert t2r.recipe.gradient_checkpointing is True


def test_softmax_score_loss_refuses_mismatched_shapes_and_bad_positions():
    positions = score_positions(6, stride=2)
    q, k = torch.randn(1, 2, len(positions), 4), torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="at the M=3 positions.*teacher_query \\(1, 2, 2, 4\\)"):
        softmax_score_loss(q, k, q[:, :, :2], k, positions)
    with pytest.raises(ValueError, match="keys of one length"):
        softmax_score_loss(q, k, q, k[:, :, :5], positions)
    with pytest.raises(ValueError, match="stride >= 1, got n=6, stride=0"):
        score_positions(6, stride=0)
