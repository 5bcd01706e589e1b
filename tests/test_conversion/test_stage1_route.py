"""Stage 1 on a sharded model routes its losses through the layers' outputs (`losses._Attach`, `losses._Readout`), so
that FSDP's backward hooks on those outputs run; the route must give the same loss value and the same gradients as
the plain path, where each loss's backward stays inside its attention module. Checked here in one process by
declaring the model sharded (`losses.is_sharded`), for both stage-1 modes, with Hedgehog's score loss and with
activation checkpointing; the FSDP run itself is `test_distributed_uptrain.test_fsdp_matches_one_process`."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from hf_fastattn.conversion import convert, losses
from hf_fastattn.conversion.distill import attention_transfer_loss, layer_transfer_loss, set_trainable
from hf_fastattn.conversion.losses import stage1_step
from hf_fastattn.conversion.uptraining import activation_checkpointing

CASES = {
    # mode, method, options, score weight
    "attention-hybrid": ("attention", "hedgehog", {"hybrid": True, "window": 4}, 0.0),
    "attention-score": ("attention", "t2r", {"feature_dim": 16}, 1.0),
    "layer": ("layer", "hedgehog", {"hybrid": True, "window": 4}, 0.0),
    "layer-score": ("layer", "t2r", {"feature_dim": 16}, 0.5),
    # a softmax student's score loss (`losses.softmax_score_loss`, against the original's captured q and k)
    "layer-mqa-score": ("layer", "mqa", {}, 1.0),
}


def _step(student, teacher, mode, score, batch, checkpointing):
    student.zero_grad(set_to_none=True)
    with (
        activation_checkpointing(student, checkpointing, input_grads=False),
        stage1_step(student, teacher if mode == "layer" else None, score),
    ):
        if mode == "layer":
            loss = layer_transfer_loss(student, teacher, batch, score)
        else:
            loss = attention_transfer_loss(student, batch, score)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_routed_losses_give_the_plain_gradients(monkeypatch, case, checkpointing):
    mode, method, options, score = CASES[case]
    torch.manual_seed(0)
    teacher = tiny_model("llama", num_hidden_layers=3)
    student = convert(teacher, method, **options)
    set_trainable(student, "attention" if mode == "layer" else "attention_transfer")
    student.train()
    ids = random_ids(0, 2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    batch = {"input_ids": ids, "attention_mask": mask}

    plain_loss, plain = _step(student, teacher, mode, score, batch, checkpointing)
    routed_hooks = []  # the route is taken: every attention module's output carries its loss
    monkeypatch.setattr(losses, "is_sharded", lambda model: True)
    monkeypatch.setattr(losses._Attach, "backward", _counting(losses._Attach.backward, routed_hooks))
    routed_loss, routed = _step(student, teacher, mode, score, batch, checkpointing)

    assert len(routed_hooks) == 3
    assert plain and plain.keys() == routed.keys()
    torch.testing.assert_close(routed_loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(routed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _counting(backward, calls):
    def counted(ctx, grad):
        calls.append(1)
        return backward(ctx, grad)

    return staticmethod(counted)


def test_routed_loss_without_its_readout_is_an_error(monkeypatch):
    """A loss attached to an output but reached by a backward that did not start at the step's read-out would get
    no gradient scale: it says so instead of training on a wrong gradient."""
    route = losses.LossRoute(layers=1, score_weight=0.0)
    loss = torch.tensor(2.0, requires_grad=True)
    out = losses._Attach.apply(torch.ones(3), loss, route)
    with pytest.raises(RuntimeError, match="without its read-out"):
        out.sum().backward()
