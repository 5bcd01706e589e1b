"""Transformers glue of "mqa": K/V mean-pooled into `kv_groups` heads at run time, then SDPA, with the
`sdpa_attention_forward` contract; and the key-norm hooks that make it exact where the attention normalizes each key
head (Qwen3, Gemma 3/4, HunYuan, LFM2, Persimmon, Llama 4, ...: `head_norms`, `enable_mqa_key_pooling`, run whenever
"mqa" is set: the variant's `prepare_model`)."""

from __future__ import annotations

import functools
import inspect
import re
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


# set on attention modules whose key (and value) norms `enable_mqa_key_pooling` hooked
POOLED_BEFORE_NORM = "_fastattn_mqa_pooled_before_norm"
# which call of a norm shared by queries and keys (Llama 4's `qk_norm`) the current forward is at
_SHARED_NORM_CALLS = "_fastattn_mqa_shared_norm_calls"

# `<role> = self.<name>(` in an attention forward: the modules applied to the queries, keys and values
_CALL = re.compile(r"\b(query_states|key_states|value_states|query|key|value|q|k|v)\s*=\s*self\.(\w+)\(")
_ROLE = {"query_states": "query", "query": "query", "q": "query", "key_states": "key", "key": "key", "k": "key",
         "value_states": "value", "value": "value", "v": "value"}


@dataclass(frozen=True)
class HeadNorms:
    """The per-head norms an attention module applies to its keys and values before the attention function, read
    from its forward's code: `key` and `value` are attribute names (Qwen3, Gemma 3, HY-V3, NanoChat: `k_norm`;
    HunYuan: `key_layernorm`; LFM2, Persimmon: `k_layernorm`; Gemma 4: `k_norm` and `v_norm`); `shared` names a norm
    applied to the queries and then to the keys (Llama 4's `qk_norm`), with the index of the key call among its
    calls in one forward."""

    key: tuple[str, ...] = ()
    value: tuple[str, ...] = ()
    shared: tuple[str, int] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.key, *self.value, *(self.shared[:1] if self.shared else ()))


@functools.cache
def _norm_calls(cls: type) -> tuple[tuple[str, str], ...]:
    """((role, attribute), ...) in the order `cls.forward` calls them on queries, keys and values."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ()
    return tuple((_ROLE[m.group(1)], m.group(2)) for m in _CALL.finditer(source))


def head_norms(module: torch.nn.Module) -> HeadNorms:
    """The key and value norms of an attention module (see `HeadNorms`): the modules its forward applies to keys or
    values whose class is a norm (RMSNorm, LayerNorm, L2Norm, ...), those it has (Gemma 4's KV-sharing layers have
    none)."""

    def is_norm(name: str) -> bool:
        child = getattr(module, name, None)
        return isinstance(child, torch.nn.Module) and "norm" in type(child).__name__.lower()

    calls = [(role, name) for role, name in _norm_calls(type(module)) if is_norm(name)]
    queries = {name for role, name in calls if role == "query"}
    keys = tuple(dict.fromkeys(name for role, name in calls if role == "key" and name not in queries))
    values = tuple(dict.fromkeys(name for role, name in calls if role == "value" and name not in queries))
    shared = next((name for role, name in calls if role == "key" and name in queries), None)
    if shared is not None:  # which of its calls is the key's
        shared = (shared, [role for role, name in calls if name == shared].index("key"))
    return HeadNorms(key=keys, value=values, shared=shared)


def mqa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"mqa": K/V mean-pooled into `kv_groups` heads at run time (Ainslie et al. 2023 init), then SDPA.

    This is exactly the model whose K/V projections were mean-pooled (`hf_fastattn.convert(model, "mqa")`, or "gqa"
    with `num_key_value_heads=kv_groups`), in every supported family:
    - Llama, Mistral, Qwen2, GPT-2, BERT: the keys arrive after RoPE (or none), which rotates every head alike, so
      pooling them here equals pooling the projections.
    - Qwen3, Gemma 3/4, HunYuan, LFM2, Persimmon, Llama 4, NanoChat ... normalize each key head (`head_norms`:
      `k_norm`, `key_layernorm`, `k_layernorm`, Llama 4's `qk_norm` shared with the queries; Gemma 4 its values too,
      `v_norm`), before or after RoPE, and the mean of normalized heads is not the normalized mean. So
      `enable_mqa_key_pooling` (run when "mqa" is set: `from_pretrained`, `from_config`, `set_attn_implementation`)
      hooks those norms to pool their input *before* the norm; the heads of a group then arrive equal and one per
      group is kept. A module with such a norm but without the hook is refused rather than computing the other
      model (mean of normalized keys).
    """
    check_supported(module, "mqa")
    groups = variant_options(module.config, "mqa").kv_groups
    norms = head_norms(module)
    if norms.names and not getattr(module, POOLED_BEFORE_NORM, False):
        raise ValueError(
            f"hf_fastattn 'mqa': {type(module).__name__} normalizes each key head ({', '.join(norms.names)}), so its "
            "keys must be pooled before the norm; set the implementation with model.set_attn_implementation('mqa') or "
            "from_pretrained(..., attn_implementation='mqa') (not by assigning config._attn_implementation), "
            "or call hf_fastattn.integration.registry.enable_mqa_key_pooling(model)"
        )
    if norms.key or norms.shared:
        hkv = key.shape[1]
        if hkv % groups != 0:
            mean_pool_heads(key, groups)  # raises the error naming the valid values
        key = key[:, :: hkv // groups]  # the group's heads are equal (pooled before the key norm)
    else:
        key = mean_pool_heads(key, groups)
    value = mean_pool_heads(value, groups)
    shim = SimpleNamespace(
        num_key_value_groups=query.shape[1] // groups, is_causal=getattr(module, "is_causal", True),
        layer_idx=getattr(module, "layer_idx", None),
    )
    return sdpa_attention_forward(shim, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


def _pool_before_norm(attention: torch.nn.Module, norm: torch.nn.Module, args, key_call: int | None = None):
    """Forward pre-hook of a key or value norm of `attention` (input: the projected keys or values, `[B, N, Hkv, D]`
    as Qwen3 norms them or `[B, Hkv, N, D]` as Gemma 3 does, after its transpose): under "mqa", replace each head by
    the mean of its group of Hkv / kv_groups heads, as a model with mean-pooled K/V projections computes.
    `key_call`: the norm is shared with the queries (Llama 4's `qk_norm`), and only its `key_call`-th call in a
    forward of `attention` (counted from `_count_shared_calls`) normalizes keys."""
    if key_call is not None:
        call = getattr(attention, _SHARED_NORM_CALLS, 0)
        setattr(attention, _SHARED_NORM_CALLS, call + 1)
        if call != key_call:
            return None
    if getattr(attention.config, "_attn_implementation", None) != "mqa":
        return None
    (keys, *rest) = args
    groups = variant_options(attention.config, "mqa").kv_groups
    axis = _head_axis(attention, keys)
    hkv = keys.shape[axis]
    if hkv == groups:
        return None  # one group per K/V head: nothing to pool
    if hkv % groups != 0:
        raise ValueError(f"mqa: kv_groups={groups} must divide the model's {hkv} key/value heads")
    shape = list(keys.shape)
    grouped = keys.unflatten(axis, (groups, hkv // groups))
    pooled = grouped.mean(axis + 1, keepdim=True).expand(grouped.shape)
    return (pooled.reshape(shape), *rest)


def _count_shared_calls(attention: torch.nn.Module, args) -> None:
    """Forward pre-hook of an attention module whose norm is shared by queries and keys: a new forward, call 0."""
    setattr(attention, _SHARED_NORM_CALLS, 0)


def _head_axis(attention: torch.nn.Module, keys: torch.Tensor) -> int:
    """Which axis of the keys `[B, ., ., D]` reaching a key norm holds the K/V heads (1 or 2): the one whose size is
    the model's K/V head count; when both are (as many tokens as heads), the one with the smaller stride: the keys
    come from a projection laid out token-major, `[B, N, Hkv, D]` (Persimmon's fused one `[B, N, H, 3, D]`), viewed
    as such or transposed to `[B, Hkv, N, D]` (also through RoPE, which keeps the layout)."""
    config = attention.config
    hkv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if keys.dim() != 4:
        raise ValueError(f"mqa: the key norm of {type(attention).__name__} got keys of shape {tuple(keys.shape)}, "
                         "expected [B, N, Hkv, D] or [B, Hkv, N, D]")
    matches = [axis for axis in (1, 2) if keys.shape[axis] == hkv]
    if len(matches) != 1:  # as many tokens as heads, or a per-layer head count: read the layout from the strides
        if keys.stride(1) == keys.stride(2):
            raise ValueError(
                f"mqa: the key norm of {type(attention).__name__} got keys of shape {tuple(keys.shape)}, whose head "
                f"axis cannot be told apart from the token axis (the model has {hkv} key/value heads)"
            )
        matches = [1 if keys.stride(1) < keys.stride(2) else 2]
    return matches[0]


def enable_mqa_key_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Hook the per-head key and value norms (`head_norms`) of every attention module of `model` so that "mqa" pools
    the keys and values before them (see `mqa_attention_forward`). Idempotent; the hooks do nothing unless the
    implementation is "mqa".

    Returns:
        The model.
    """
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int) or getattr(module, POOLED_BEFORE_NORM, False):
            continue
        norms = head_norms(module)
        for name in (*norms.key, *norms.value):
            getattr(module, name).register_forward_pre_hook(functools.partial(_pool_before_norm, module))
        if norms.shared is not None:
            name, key_call = norms.shared
            module.register_forward_pre_hook(_count_shared_calls)
            getattr(module, name).register_forward_pre_hook(
                functools.partial(_pool_before_norm, module, key_call=key_call)
            )
        if norms.names:
            setattr(module, POOLED_BEFORE_NORM, True)
    return model


# the former name of `_pool_before_norm` (a key norm's pre-hook)
_pool_keys_before_norm = _pool_before_norm
