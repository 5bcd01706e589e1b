"""What conversion needs to know about each supported architecture family, in one table.

A family says which modules are the attention modules handed to the attention function (where learned feature maps
are attached), their head counts, whether they are causal, how K and V are projected (for mean pooling) and which
modules LoRA targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..integration.registry import SUPPORTED_MODEL_TYPES

CONVERTED_PREFIX = "hf_fastattn_"


@dataclass(frozen=True)
class Family:
    """Args:
    name: the base `model_type` ("llama", "gpt2", ...).
    attention_class: class name of the module that calls the attention function.
    native_gqa: the architecture has `num_key_value_heads` (a pooled model is a standard checkpoint).
    causal: decoder (True) or encoder (False).
    lora_targets: a peft `target_modules` regex for the attention projections.
    """

    name: str
    attention_class: str
    native_gqa: bool
    causal: bool
    lora_targets: str


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaAttention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "mistral": Family(
        "mistral", "MistralAttention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    ),
    "qwen2": Family("qwen2", "Qwen2Attention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "qwen3": Family("qwen3", "Qwen3Attention", True, True, r".*self_attn\.(q_proj|k_proj|v_proj|o_proj)"),
    "gpt2": Family("gpt2", "GPT2Attention", False, True, r".*\.attn\.(c_attn|c_proj)"),
    "bert": Family(
        "bert", "BertSelfAttention", False, False, r".*attention\.(self\.(query|key|value)|output\.dense)"
    ),
}
assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def base_model_type(config) -> str:
    return str(getattr(config, "model_type", "")).removeprefix(CONVERTED_PREFIX)


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model, or a ValueError naming the supported ones."""
    config = getattr(model, "config", None)
    model_type = base_model_type(config) if config is not None else None
    if model_type not in FAMILIES:
        raise ValueError(
            f"hf_fastattn.convert: model_type {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"model types are {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def attention_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The self-attention modules, in layer order (GPT-2 cross attention excluded)."""
    found = [
        m
        for m in model.modules()
        if type(m).__name__ == family.attention_class and not getattr(m, "is_cross_attention", False)
    ]
    if not found:
        raise ValueError(
            f"hf_fastattn.convert: no {family.attention_class} modules found in {type(model).__name__}"
        )
    return found


def head_counts(config, family: Family) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head dim D)."""
    if family.name == "gpt2":
        return config.n_head, config.n_head, config.n_embd // config.n_head
    h = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // h
    return h, getattr(config, "num_key_value_heads", None) or h, d


def _pool_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Rows `[heads * D, ...]` -> `[groups * D, ...]`: the mean over each run of heads / groups consecutive heads."""
    rest = w.shape[1:]
    return w.reshape(groups, heads // groups, head_dim, *rest).mean(1).reshape(groups * head_dim, *rest)


def _tie_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Like `_pool_rows` but each group's mean is written back to all its heads (same shape as `w`)."""
    rest = w.shape[1:]
    pooled = w.reshape(groups, heads // groups, head_dim, *rest).mean(1, keepdim=True)
    return pooled.expand(groups, heads // groups, head_dim, *rest).reshape(w.shape)


@torch.no_grad()
def pool_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Mean-pool the K and V projections (weights and biases) into `groups` heads, in place.

    Native-GQA families get smaller k/v projections and `config.num_key_value_heads = groups` (a standard model).
    GPT-2 and BERT keep their shapes: every head of a group gets the group's mean, so the model equals the pooled one
    and the "mqa" attention function (kv_groups = groups) computes it with `groups` K/V heads.
    """
    config = model.config
    h, hkv, d = head_counts(config, family)
    if groups < 1 or hkv % groups != 0:
        raise ValueError(
            f"num_key_value_heads={groups} must divide the model's {hkv} key/value heads "
            f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
        )
    for module in attention_modules(model, family):
        if family.native_gqa:
            for name in ("k_proj", "v_proj"):
                old: nn.Linear = getattr(module, name)
                new = nn.Linear(old.in_features, groups * d, bias=old.bias is not None)
                new.to(device=old.weight.device, dtype=old.weight.dtype)
                new.weight.copy_(_pool_rows(old.weight, hkv, groups, d))
                if old.bias is not None:
                    new.bias.copy_(_pool_rows(old.bias, hkv, groups, d))
                setattr(module, name, new)
            module.num_key_value_groups = h // groups
        elif family.name == "gpt2":
            # Conv1D: weight [E, 3E] with output columns q | k | v, bias [3E]
            e = h * d
            w, b = module.c_attn.weight, module.c_attn.bias
            for part in (1, 2):
                cols = slice(part * e, (part + 1) * e)
                w[:, cols] = _tie_rows(w[:, cols].t(), h, groups, d).t()
                b[cols] = _tie_rows(b[cols], h, groups, d)
        else:  # bert
            for lin in (module.key, module.value):
                lin.weight.copy_(_tie_rows(lin.weight, h, groups, d))
                lin.bias.copy_(_tie_rows(lin.bias, h, groups, d))
    if family.native_gqa:
        config.num_key_value_heads = groups
