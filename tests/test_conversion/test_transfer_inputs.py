"""Stage 1 (attention transfer, LoLCATs) feeds each layer its own teacher inputs: the converted attention returns the
teacher's softmax output, so every layer sees exactly the hidden states the original model computes there, and the
backward pass of the stage-1 loss stays inside the attention modules (it never runs through an MLP, a norm outside
attention, or the LM head): each layer's maps learn from their own layer's loss alone."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.distill import attention_transfer, attention_transfer_loss, set_trainable
from hf_fastattn.conversion.families import attention_modules, family_of


def _attention_inputs(model):
    """Hooks recording each attention module's `hidden_states` input, in layer order."""
    seen, handles = {}, []
    for i, module in enumerate(attention_modules(model, family_of(model))):

        def hook(mod, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen[i] = hidden.detach().clone()

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("options", [{}, {"hybrid": True, "window": 4}])
def test_each_layer_gets_the_teachers_inputs_and_its_own_gradient(options):
    torch.manual_seed(0)
    teacher = tiny_model("llama", num_hidden_layers=3)
    student = convert(teacher, "hedgehog", **options)
    set_trainable(student, "attention_transfer")
    ids = random_ids(0, 2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding

    seen_teacher, handles = _attention_inputs(teacher)
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    seen_student, handles = _attention_inputs(student)

    # no backward through the model: a hook on every MLP and on the LM head would see a gradient if it ran
    reached = []
    for name, module in student.named_modules():
        if name.endswith("mlp") or name == "lm_head" or name.endswith("post_attention_layernorm"):
            handles.append(module.register_full_backward_hook(lambda m, gi, go, name=name: reached.append(name)))
    loss = attention_transfer_loss(student, {"input_ids": ids, "attention_mask": mask})
    loss.backward()
    for h in handles:
        h.remove()

    assert len(seen_student) == len(seen_teacher) == 3
    for i in range(3):  # layer i's input is the original model's hidden state there
        torch.testing.assert_close(seen_student[i], seen_teacher[i], rtol=0, atol=1e-6)
    assert reached == []

    # each layer's maps get the gradient of that layer's own loss (the total is their mean)
    modules = attention_modules(student, family_of(student))
    total = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    assert total and all(g.abs().sum() > 0 for g in total.values())
    student.zero_grad(set_to_none=True)
    layer = 1
    with attention_transfer(student) as mods:
        student(input_ids=ids, attention_mask=mask, use_cache=False)
        losses = [m.__dict__.pop("fastattn_transfer_loss") for m in mods]
    (losses[layer] / len(losses)).backward()
    own = {n: p.grad for n, p in student.named_parameters() if p.requires_grad and p.grad is not None}
    prefix = f"layers.{layer}."
    assert own and all(prefix in n for n in own)  # no other layer's maps get a gradient from layer 1's loss
    for n, g in own.items():
        torch.testing.assert_close(g, total[n], rtol=1e-5, atol=1e-8)
    assert modules[layer] is mods[layer]
