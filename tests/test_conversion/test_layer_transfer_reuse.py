"""The "layer" stage 1 keeps the residual stream the teacher's, so the student's frozen blocks (MLPs, the head, BERT's
output projections) see the teacher's inputs: `layer_transfer` has them return the teacher's outputs instead of
computing them again. The loss and the gradients must be those of the full student forward (the reference: the same
loss with the reuse switched off), the skipped blocks' Linear layers must not run, and a block whose weights differ
from the teacher's, or that drops out (training mode), must compute its own output."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from torch import nn

from hf_fastattn.conversion import convert, losses
from hf_fastattn.conversion.losses import layer_transfer_loss
from hf_fastattn.conversion.uptraining import set_trainable


def _linear_calls(model, monkeypatch):
    """Counts, by name, the Linear / Conv1D computations (their class `forward`) outside the attention modules."""
    from transformers.pytorch_utils import Conv1D

    names = {
        id(m): n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and "attn" not in n and ".attention.self." not in n
    }
    calls = {}
    for cls in (nn.Linear, Conv1D):

        def forward(self, x, _original=cls.forward):
            if id(self) in names:
                calls[names[id(self)]] = calls.get(names[id(self)], 0) + 1
            return _original(self, x)

        monkeypatch.setattr(cls, "forward", forward)
    return calls


def _loss_and_grads(student, teacher, inputs):
    student.zero_grad(set_to_none=True)
    loss = layer_transfer_loss(student, teacher, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_frozen_blocks_reuse_the_teachers_outputs(family, monkeypatch):
    torch.manual_seed(0)
    teacher = tiny_model(family, num_hidden_layers=3) if family != "gpt2" else tiny_model(family, n_layer=3)
    options = {} if family == "bert" else {"hybrid": True, "window": 4}  # the hybrid is for decoders
    student = convert(teacher, "hedgehog", **options)
    set_trainable(student, "attention")
    ids = random_ids(0, 2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask}

    calls = _linear_calls(student, monkeypatch)
    loss, grads = _loss_and_grads(student, teacher, inputs)
    reused_calls = dict(calls)
    calls.clear()
    with monkeypatch.context() as m:  # the reference: the student's whole forward, every block computed
        m.setattr(losses, "_reuse_teacher_outputs", lambda *a: ([], []))
        ref_loss, ref_grads = _loss_and_grads(student, teacher, inputs)
    full_calls = dict(calls)
    calls.clear()

    assert full_calls and reused_calls == {}  # with the reuse, no MLP / head / output Linear ran in the student
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in student.modules())  # the patch is gone after the step
    assert not any(m._forward_hooks for m in teacher.modules())  # and so are the hooks on the teacher

    # a frozen block that no longer equals the teacher's computes its own output
    changed = next(name for name in full_calls if name.rsplit(".", 1)[0] != "")
    with torch.no_grad():
        student.get_submodule(changed).weight.mul_(1.5)
    layer_transfer_loss(student, teacher, inputs)
    assert calls.get(changed) == 1


def test_no_reuse_while_dropout_is_active():
    """GPT-2 drops out in training mode (its teacher, in eval mode, does not): the residual streams differ, so the
    student computes every block of its own."""
    torch.manual_seed(0)
    teacher = tiny_model("gpt2")
    student = convert(teacher, "hedgehog", hybrid=True, window=4).train()
    set_trainable(student, "attention")
    ids = random_ids(0, 2, 24)
    with pytest.MonkeyPatch.context() as m:
        calls = _linear_calls(student, m)
        layer_transfer_loss(student, teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert any(".mlp." in name for name in calls) and "lm_head" in calls
