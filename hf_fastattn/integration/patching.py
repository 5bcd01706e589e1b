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
"""

from __future__ import annotations

import functools

from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache

from .cache import RecurrentCache

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
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if isinstance(cache, RecurrentCache):
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
