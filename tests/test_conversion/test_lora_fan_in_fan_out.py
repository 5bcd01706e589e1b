"""`add_lora` sets peft's `fan_in_fan_out` from the projections it targets (transformers' `Conv1D` stores its weight
[in, out]), not from the family's name: a Llama whose projections are `Conv1D` gets it, and its LoRA model computes
what the same adapters compute on the `nn.Linear` original."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import random_ids, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_fastattn.conversion.uptraining import add_lora

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _as_conv1d(model):
    """The same Llama with every attention projection a `Conv1D` holding the transposed weight (same function)."""
    for layer in model.model.layers:
        for name in PROJECTIONS:
            linear: nn.Linear = getattr(layer.self_attn, name)
            conv = Conv1D(linear.out_features, linear.in_features)
            with torch.no_grad():
                conv.weight.copy_(linear.weight.t())
                conv.bias.zero_()
            setattr(layer.self_attn, name, conv)
    return model


def _fan_in_fan_out(peft_model) -> bool:
    return peft_model.peft_config["default"].fan_in_fan_out


@pytest.mark.parametrize("family, expected", [("llama", False), ("gpt2", True)])
def test_fan_in_fan_out_follows_the_projection_type(family, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns when the flag disagrees with a target module
        peft_model = add_lora(tiny_model(family), rank=4)
    assert _fan_in_fan_out(peft_model) is expected


def test_conv1d_projections_in_another_family_get_fan_in_fan_out():
    ids = random_ids(n=16)
    linear = tiny_model("llama", initializer_range=0.2)
    conv = _as_conv1d(tiny_model("llama", initializer_range=0.2))
    with torch.no_grad():
        plain = linear(ids).logits
        torch.testing.assert_close(conv(ids).logits, plain, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lora_conv = add_lora(conv, rank=4)
    lora_linear = add_lora(linear, rank=4)
    assert _fan_in_fan_out(lora_conv) is True and _fan_in_fan_out(lora_linear) is False
    # the same adapters (A: [r, in], B: [out, r] in both layouts) on both: the same function
    torch.manual_seed(0)
    linear_params = dict(lora_linear.named_parameters())
    with torch.no_grad():
        for name, p in lora_conv.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
                linear_params[name].copy_(p)
        want = lora_linear(ids).logits
        got = lora_conv(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapters do change the function
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    merged = lora_conv.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-5)
