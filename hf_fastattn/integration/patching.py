"""Recurrent decoding without changing a model's code: attention-module hooks and generate's cache choice.

A registered attention function receives keys and values *after* the module updated the cache, and has no handle
on the cache itself. So for a causal "linear" / "fast" model:

1. every attention module gets a forward pre-hook that, when the forward carries a `RecurrentCache`, puts that
   cache's layer on the module (`module.fastattn_recurrent_layer`) and arms it; a post-hook takes it off. The
   registered attention function then runs the recurrent form on the layer's state (see `registry.py`).
2. `GenerationMixin._prepare_cache_for_generation` is wrapped so that `generate` makes a `RecurrentCache` instead of
   the default `DynamicCache` for such models, and prepares the model with (1). Nothing is needed from the user.

Models whose attention is anything else (sdpa, "sparse", "mqa") keep transformers' own caches. The sliding-window
hybrid ("linear" with the "window" option) decodes recurrently too: its layers keep the linear state plus the last
`window` keys and values.

`install_attn_implementation_checks` wraps four `PreTrainedModel` methods so that setting an implementation is checked
when it is set (`registry.validate_implementation`), not at the first forward of a fully loaded model:

- `_check_and_adjust_attn_implementation` (run by every model's `__init__`, so by `from_pretrained` and
  `from_config` before any weight loads, and by `set_attn_implementation`): validates hf_fastattn's names.
- `set_attn_implementation`: validates before delegating. Models that do not dispatch through `AttentionInterface`
  (Bloom, MPT) would otherwise accept the name with a logged warning and keep their own softmax attention. What is
  checked is the compatibility rule of `hf_fastattn.integration.compatibility`.
- `get_correct_attn_implementation`: transformers' error for an unknown name lists only its own names; ours are
  added, with the closest valid names ("Linear" -> "linear").
- `post_init` (the end of every model's `__init__`): "mqa" on Qwen3 needs its key-norm hook
  (`registry.enable_mqa_key_pooling`).
"""

from __future__ import annotations

import functools

from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import RecurrentCache
from .registry import (
    IMPLEMENTATIONS,
    enable_mqa_key_pooling,
    unknown_implementation_hint,
    validate_implementation,
)

RECURRENT_IMPLEMENTATIONS = ("linear", "fast")
_HOOKED = "_fastattn_recurrent_hooks"


def uses_recurrent_state(config) -> bool:
    """Whether a model with `config` decodes with a `RecurrentCache`: causal "linear" / "fast" attention, the
    sliding-window hybrid included."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "_attn_implementation", None) not in RECURRENT_IMPLEMENTATIONS:
        return False
    return not getattr(text, "is_encoder_decoder", False)


def _attention_modules(model: nn.Module):
    for module in model.modules():
        # the self-attention modules of every supported family: they own a layer index and call cache.update
        if isinstance(getattr(module, "layer_idx", None), int) and type(module).__name__.endswith("Attention"):
            if not getattr(module, "is_cross_attention", False):
                yield module


def _arm(module, args, kwargs):
    # families name the argument differently (cache, past_key_values, layer_past; GPT-NeoX, CTRL, GPT-BigCode) or pass
    # it by position: look for the cache itself
    cache = next((v for v in (*kwargs.values(), *args) if isinstance(v, RecurrentCache)), None)
    if cache is not None:
        impl = getattr(module.config, "_attn_implementation", None)
        if impl not in RECURRENT_IMPLEMENTATIONS:
            # the module would run `impl` on the new tokens' keys alone (a RecurrentCache keeps no K/V): refuse
            raise ValueError(
                f"RecurrentCache was made for another model: this model's attention runs attn_implementation={impl!r}, "
                "but a RecurrentCache serves hf_fastattn 'linear' / 'fast' attention only; let generate use its "
                "default cache (DynamicCache)."
            )
        if module.layer_idx == 0 or module.layer_idx >= len(cache.layers):
            # once per forward (layer 0), and whenever the layer has no state in this cache
            cache.check_compatible(module.config)
        layer = cache.layers[module.layer_idx]
        layer.armed = True
        module.fastattn_recurrent_layer = layer
    return None


def _disarm(module, args, kwargs, output):
    layer = module.__dict__.pop("fastattn_recurrent_layer", None)
    if layer is not None:
        layer.armed = False
    return None


def enable_recurrent_decoding(model: nn.Module) -> nn.Module:
    """Prepare the attention modules of `model` to run on a `RecurrentCache` (idempotent; `generate` calls it).

    Returns the model. Raises `ValueError` if the model has no attention modules this can serve.
    """
    modules = list(_attention_modules(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention modules with a layer_idx to decode recurrently")
    for module in modules:
        if not getattr(module, _HOOKED, False):
            module.register_forward_pre_hook(_arm, with_kwargs=True)
            module.register_forward_hook(_disarm, with_kwargs=True, always_call=True)
            setattr(module, _HOOKED, True)
    return model


def _cache_key(model_kwargs: dict) -> str:
    return "cache" if "cache" in model_kwargs else "past_key_values"


_original_prepare_cache = GenerationMixin._prepare_cache_for_generation


@functools.wraps(_original_prepare_cache)
def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    result = _original_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs)
    key = _cache_key(model_kwargs)
    cache = model_kwargs.get(key)
    if isinstance(cache, RecurrentCache):
        cache.check_compatible(self.config)
        enable_recurrent_decoding(self)
    elif type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and uses_recurrent_state(self.config):
        model_kwargs[key] = RecurrentCache(self)
    return result


def install_generate_hook() -> None:
    """Make `generate` choose a `RecurrentCache` for recurrent models (done once by `import hf_fastattn`)."""
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


_original_check_and_adjust = PreTrainedModel._check_and_adjust_attn_implementation
_original_get_correct = PreTrainedModel.get_correct_attn_implementation
_original_set_attn_implementation = PreTrainedModel.set_attn_implementation
_original_post_init = PreTrainedModel.post_init


@functools.wraps(_original_check_and_adjust)
def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
    applicable = _original_check_and_adjust(self, attn_implementation, *args, **kwargs)
    if applicable in IMPLEMENTATIONS:
        validate_implementation(self.config, applicable, type(self))
    return applicable


@functools.wraps(_original_get_correct)
def _get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
    try:
        return _original_get_correct(self, requested_attention, *args, **kwargs)
    except ValueError as err:
        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        if not isinstance(requested_attention, str) or requested_attention in valid:
            raise  # not the unknown-name error (e.g. sdpa asked for but unavailable)
        raise ValueError(f"{err} {unknown_implementation_hint(requested_attention, valid)}") from err


@functools.wraps(_original_set_attn_implementation)
def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    requested = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
    if requested in IMPLEMENTATIONS:
        # before transformers' own, which accepts the name with only a logged warning where it would be ignored
        validate_implementation(self.config, requested, type(self))
    _original_set_attn_implementation(self, attn_implementation, *args, **kwargs)
    if getattr(self.config, "_attn_implementation", None) == "mqa":
        enable_mqa_key_pooling(self)


@functools.wraps(_original_post_init)
def _post_init(self, *args, **kwargs):
    result = _original_post_init(self, *args, **kwargs)
    if getattr(self.config, "_attn_implementation", None) == "mqa":
        enable_mqa_key_pooling(self)
    return result


def install_attn_implementation_checks() -> None:
    """Check hf_fastattn's implementations when they are set, list them in transformers' unknown-name error, and
    prepare "mqa" models (done once by `import hf_fastattn`; see the module docstring)."""
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    PreTrainedModel.get_correct_attn_implementation = _get_correct_attn_implementation
    PreTrainedModel.set_attn_implementation = _set_attn_implementation
    PreTrainedModel.post_init = _post_init
