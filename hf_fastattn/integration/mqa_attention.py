"""Transformers glue of "mqa": K/V mean-pooled into `kv_groups` heads at run time, then SDPA, with the
`sdpa_attention_forward` contract; and the key-norm hook that makes it exact on Qwen3 (`enable_mqa_key_pooling`, run
whenever "mqa" is set: the variant's `prepare_model`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .common import check_supported
from .variants import variant_options


def kv_heads(config) -> int | None:
    """The number of key/value heads the attention function receives (None when the config does not say)."""
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)


def check_kv_groups(config, groups: int) -> None:
    """Raise a ValueError unless `groups` divides the K/V heads of `config` (no check when it has no head count)."""
    heads = kv_heads(config)
    if isinstance(heads, int) and heads % groups != 0:
        raise ValueError(
            f"hf_fastattn: fastattn option kv_groups={groups} must divide the model's {heads} key/value heads "
            f"(valid: {[g for g in range(1, heads + 1) if heads % g == 0]})"
        )


@dataclass
class MqaOptions:
    """Options of "mqa" in `config.fastattn`."""

    kv_groups: int = field(
        default=1,
        metadata={"help": "number of K/V head groups after mean pooling (1 = multi-query, G = grouped-query)."},
    )

    def __post_init__(self):
        if isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int) or self.kv_groups < 1:
            raise ValueError(f"fastattn option kv_groups must be a positive int, got {self.kv_groups!r}")

    def check_model_config(self, config) -> None:
        """Raise a ValueError unless `kv_groups` divides the model's K/V heads."""
        check_kv_groups(config, self.kv_groups)


def mean_pool_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, Hkv, N, D]` -> `[B, groups, N, D]`: the mean of each run of Hkv / groups consecutive heads."""
    b, hkv, n, d = x.shape
    if hkv % groups != 0:
        raise ValueError(f"mqa: kv_groups={groups} must divide the model's {hkv} key/value heads")
    return x.view(b, groups, hkv // groups, n, d).mean(2)


# set on attention modules that normalize each key head (Qwen3's `k_norm`) once `enable_mqa_key_pooling` hooked them
POOLED_BEFORE_NORM = "_fastattn_mqa_pooled_before_norm"


def mqa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"mqa": K/V mean-pooled into `kv_groups` heads at run time (Ainslie et al. 2023 init), then SDPA.

    This is exactly the model whose K/V projections were mean-pooled (`hf_fastattn.convert(model, "mqa")`, or "gqa"
    with `num_key_value_heads=kv_groups`), in every supported family:
    - Llama, Mistral, Qwen2, GPT-2, BERT: the keys arrive after RoPE (or none), which rotates every head alike, so
      pooling them here equals pooling the projections.
    - Qwen3 normalizes each key head (`k_norm`, RMSNorm) before RoPE, and the mean of normalized heads is not the
      normalized mean. So `enable_mqa_key_pooling` (run when "mqa" is set: `from_pretrained`, `from_config`,
      `set_attn_implementation`) hooks `k_norm` to pool the projected keys *before* the norm; the heads of a group
      then arrive equal and one per group is kept. A Qwen3 module without the hook is refused rather than computing
      the other model (mean of normalized keys).
    """
    check_supported(module, "mqa")
    groups = variant_options(module.config, "mqa").kv_groups
    if getattr(module, "k_norm", None) is not None:
        if not getattr(module, POOLED_BEFORE_NORM, False):
            raise ValueError(
                f"hf_fastattn 'mqa': {type(module).__name__} normalizes each key head (k_norm), so its keys must be "
                "pooled before the norm; set the implementation with model.set_attn_implementation('mqa') or "
                "from_pretrained(..., attn_implementation='mqa') (not by assigning config._attn_implementation), "
                "or call hf_fastattn.integration.registry.enable_mqa_key_pooling(model)"
            )
        hkv = key.shape[1]
        if hkv % groups != 0:
            mean_pool_heads(key, groups)  # raises the error naming the valid values
        key = key[:, :: hkv // groups]  # the group's heads are equal (pooled before k_norm)
    else:
        key = mean_pool_heads(key, groups)
    value = mean_pool_heads(value, groups)
    shim = SimpleNamespace(
        num_key_value_groups=query.shape[1] // groups, is_causal=getattr(module, "is_causal", True),
        layer_idx=getattr(module, "layer_idx", None),
    )
    return sdpa_attention_forward(shim, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def _pool_keys_before_norm(attention: torch.nn.Module, norm: torch.nn.Module, args):
    """Forward pre-hook of `attention.k_norm` (input: the projected keys, `[B, N, Hkv, D]` as Qwen3 norms them or
    `[B, Hkv, N, D]` as Gemma 3 does, after its transpose): under "mqa", replace each head by the mean of its group
    of Hkv / kv_groups heads, as a model with mean-pooled K projections computes."""
    if getattr(attention.config, "_attn_implementation", None) != "mqa":
        return None
    (keys, *rest) = args
    groups = variant_options(attention.config, "mqa").kv_groups
    if groups == getattr(attention.config, "num_key_value_heads", None):
        return None  # one group per K/V head: nothing to pool
    axis = _head_axis(attention, keys)
    hkv = keys.shape[axis]
    if hkv % groups != 0:
        raise ValueError(f"mqa: kv_groups={groups} must divide the model's {hkv} key/value heads")
    shape = list(keys.shape)
    grouped = keys.unflatten(axis, (groups, hkv // groups))
    pooled = grouped.mean(axis + 1, keepdim=True).expand(grouped.shape)
    return (pooled.reshape(shape), *rest)


def _head_axis(attention: torch.nn.Module, keys: torch.Tensor) -> int:
    """Which axis of the keys `[B, ., ., D]` reaching a key norm holds the K/V heads (1 or 2): the one whose size is
    the model's K/V head count; when both are (as many tokens as heads), the one with stride D (the keys come from a
    projection viewed as `[B, N, Hkv, D]`, possibly transposed)."""
    config = attention.config
    hkv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if keys.dim() != 4:
        raise ValueError(f"mqa: the key norm of {type(attention).__name__} got keys of shape {tuple(keys.shape)}, "
                         "expected [B, N, Hkv, D] or [B, Hkv, N, D]")
    matches = [axis for axis in (1, 2) if keys.shape[axis] == hkv]
    if len(matches) != 1:  # as many tokens as heads, or a per-layer head count: read the layout from the strides
        matches = [axis for axis in (1, 2) if keys.stride(axis) == keys.shape[-1]]
    if len(matches) != 1:
        raise ValueError(f"mqa: the key norm of {type(attention).__name__} got keys of shape {tuple(keys.shape)}, "
                         f"whose head axis cannot be told apart from the token axis (the model has {hkv} key/value heads)")
    return matches[0]


def enable_mqa_key_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Hook the key norm (`k_norm`, Qwen3) of every attention module of `model` so that "mqa" pools the keys before
    it (see `mqa_attention_forward`). Idempotent; the hooks do nothing unless the implementation is "mqa".

    Returns:
        The model.
    """
    for module in model.modules():
        norm = getattr(module, "k_norm", None)
        if isinstance(norm, torch.nn.Module) and isinstance(getattr(module, "layer_idx", None), int):
            if not getattr(module, POOLED_BEFORE_NORM, False):
                norm.register_forward_pre_hook(functools.partial(_pool_keys_before_norm, module))
                setattr(module, POOLED_BEFORE_NORM, True)
    return model
