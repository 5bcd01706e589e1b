"""Which transformers models hf_fastattn's attention implementations can serve: a rule derived from what the code
needs, checked when an implementation is set (and again by the attention functions, for configs edited by hand).

An implementation registered with `AttentionInterface` only runs where a model's attention module calls it, and it
only computes the right thing where the module hands it what the contract says (`registry.py`): per-head queries,
keys and values `[B, H, N, D]` / `[B, Hkv, N, D]` after the positional encoding, a mask that carries nothing but
padding and causality, and (for the constant-size `RecurrentCache` of "linear" / "fast") a cache that is one plain
K/V per layer. A model is served when all of these hold:

1. **It dispatches.** Its modeling code calls `ALL_ATTENTION_FUNCTIONS.get_interface(...)` (transformers' own
   test, `PreTrainedModel._can_set_attn_implementation`, plus: some class of the module calls it at all). Bloom, MPT,
   Falcon, GPT-Neo, XLNet... keep attention in their own eager code: transformers would accept the name with only a
   logged warning and run softmax attention as before.
2. **It is self-attention of one stack.** Encoder-decoder models (cross-attention over an encoder's states) and
   configs with `add_cross_attention` are refused.
3. **Its positions are in q and k.** RoPE (any fraction of the head), learned absolute positions and no positions at
   all reach the function inside q and k. Additive biases do not: an attention call with `position_bias=` (T5-style
   relative buckets), ALiBi (`config.alibi`), or a mask that carries learned values (Doge) are refused, because the
   O(N) forms have no logits to add them to and "sparse" takes a padding mask only.
4. **Its cache is a plain K/V per layer.** Every entry of transformers' own layer-type table for the config
   (`cache_utils.get_layer_types_and_kwargs` -> `DYNAMIC_LAYER_TYPE_MAPPING`) must be a `DynamicLayer` or a
   `DynamicSlidingWindowLayer` (full, sliding or chunked attention: the same K/V, only the mask differs). Refused:
   recurrent or state-space layers ("linear_attention" / "conv" / "hybrid" layer types, or transformers' older
   `_is_stateful` flag: Mamba, Jamba, Qwen3-Next ...), indexed sparse attention (DeepSeek-V3.2's indexer cache), layers that
   reuse another layer's K/V (Gemma 3n), modeling code with its own `Cache` class (MiniMax), and multi-head latent
   attention (`kv_lora_rank`: DeepSeek-V2/V3, MiniCPM3 ...), which caches one compressed latent per token and
   expands it into per-head K/V only after the cache update.
5. **"sparse" and "mqa" are softmax attention.** They reproduce the model's softmax, so attention that adds terms
   to it, which transformers' own sdpa refuses as well, is refused for them: logit soft-capping (`softcap=`, Gemma 2
   with `attn_logit_softcapping`) and attention sinks (`s_aux=`, GPT-OSS). "linear" and "fast" replace the softmax
   altogether; the cap and the sinks, which act on softmax logits, have no counterpart there and are not applied.

What the rule cannot read from flags or code (refusal table `REFUSED_MODEL_TYPES`) is listed with its reason.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

# the variants registered with softmax=True ("sparse", "mqa"; filled by `variants.register_attention_variant`)
SOFTMAX_IMPLEMENTATIONS: set[str] = set()

# What the code does not reveal, with the reason. Keep short: prefer a test on flags or code above.
REFUSED_MODEL_TYPES = {
    "doge": "its attention adds a learned dynamic mask (values computed from the input) to the logits through the "
    "attention mask, which hf_fastattn's functions only read as padding",
    "xmod": "X-MOD routes every forward through language adapters chosen by set_default_language; not tested",
    "reformer": "LSH / local attention in its own code, not the attention-function contract",
    "fnet": "no attention at all (Fourier transforms mix the tokens), so there is nothing to replace",
}

_DISPATCH = "ALL_ATTENTION_FUNCTIONS.get_interface("
_PLAIN_KV_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def _get(config, name: str, default=None):
    """`getattr` that also survives heterogeneous configs, which raise for per-layer attributes read globally."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001  (transformers' AmbiguousGlobalPerLayerAttributeError and the like)
        return default


def _base_model_type(config) -> str | None:
    model_type = getattr(config, "model_type", None)
    # converted checkpoints carry model_type "hf_fastattn_<family>" (see hf_fastattn.conversion.modeling)
    return model_type.removeprefix("hf_fastattn_") if isinstance(model_type, str) else model_type


def _modeling_module(cls: type | None):
    """The transformers modeling module that defines `cls` or, for subclasses defined elsewhere (converted models),
    its nearest base; None if there is none."""
    for klass in getattr(cls, "__mro__", ()):
        name = getattr(klass, "__module__", "") or ""
        if name.startswith("transformers.models.") and name in sys.modules:
            return sys.modules[name]
    return None


@functools.lru_cache(maxsize=512)
def _source_facts(module_name: str) -> dict:
    """What the modeling code of `module_name` shows: whether a class calls the attention interface, the keyword
    arguments its calls pass (position_bias, softcap, s_aux) and its own Cache subclasses."""
    module = sys.modules[module_name]
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {"readable": False}
    blocks = re.split(r"^(?=class \w+)", source, flags=re.MULTILINE)
    dispatching = [b for b in blocks if _DISPATCH in b]
    calls = " ".join(dispatching)
    # one attention call per class (a second one, as in differential attention, would fold each key twice into a
    # recurrent state) and one cache slot per attention module (looped models write layer_idx + offset)
    repeated = any(_calls_twice(b) for b in dispatching if ".update(" in b)
    looped = any(re.search(r"\.update\([^)]*self\.layer_idx\s*\+", b, flags=re.DOTALL) for b in dispatching)
    caches = sorted(
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, Cache) and obj.__module__ == module_name
    )
    return {
        "readable": True,
        "dispatches": bool(dispatching),
        "position_bias": "position_bias=" in calls,
        "softcap": "softcap=" in calls,
        "sinks": "s_aux=" in calls,
        "caches": caches,
        "repeated": repeated,
        # the classes whose code calls the attention interface (conversion attaches its feature maps to their modules)
        "dispatching_classes": sorted(re.match(r"class (\w+)", b).group(1) for b in dispatching),
        # masks built by transformers' mask interface (masking_utils), where hf_fastattn registers its padding mask
        "mask_interface": "masking_utils" in source,
        "looped": looped,
    }


def _calls_twice(block: str) -> bool:
    """Whether a cache-updating attention class calls the attention function twice in a row (two calls at the same
    indentation, as differential attention does; calls in alternative branches sit at different depths)."""
    depths = [len(m.group(1)) for m in re.finditer(r"^( *)\S.*\battention_interface\(", block, flags=re.MULTILINE)]
    return len(depths) != len(set(depths))


# transformers' cache layer types of recurrent / state-space layers (Mamba, Jamba, Qwen3-Next ...; transformers < 5.25
# also marked such models `_is_stateful`)
_RECURRENT_LAYER_TYPES = {"linear_attention", "conv", "hybrid", "hybrid_sliding"}


def _layer_types(config) -> list[str]:
    try:
        return list(get_layer_types_and_kwargs(config)[0])
    except Exception:  # a config transformers' cache cannot read: judged by the other tests
        return []


def incompatibility(model_class: type | None, config, implementation: str) -> str | None:
    """Why `implementation` cannot serve a model of `model_class` with `config`, or None if it can (see the module
    docstring for the rule).

    Args:
        model_class: the model class (a `PreTrainedModel` subclass) or one of its attention modules' classes; None
            checks the config alone.
        config: the model's config.
        implementation: "linear", "fast", "sparse" or "mqa".

    Returns:
        A sentence saying what the model does that hf_fastattn cannot serve, or None.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = _base_model_type(text) or _base_model_type(config)
    # the config class's default too: the ForCausalLM of an encoder-decoder family (BartForCausalLM) is its decoder,
    # with cross-attention layers, run with is_encoder_decoder=False
    if (_get(config, "is_encoder_decoder", False) or _get(text, "is_encoder_decoder", False)
            or getattr(type(text), "is_encoder_decoder", False) is True):
        return ("an encoder-decoder model (or its decoder alone): the decoder attends to the encoder's states "
                "(cross-attention), which the recurrent cache cannot hold; hf_fastattn serves decoder-only and "
                "encoder-only self-attention")
    if _get(text, "add_cross_attention", False):
        return "add_cross_attention=True: cross-attention over an encoder's states is not served, only self-attention"
    if model_type in REFUSED_MODEL_TYPES:
        return REFUSED_MODEL_TYPES[model_type]
    if _get(text, "alibi", False) or _get(text, "position_embedding_type", None) == "alibi":
        return "ALiBi: positions are an additive bias on the attention logits, which the O(N) forms do not have"
    if _get(text, "kv_lora_rank", None) is not None:
        return ("multi-head latent attention (kv_lora_rank): the cache holds one compressed latent per token, "
                "expanded into per-head keys and values only after the cache update, not the per-layer K/V the "
                "recurrent cache follows")
    layer_types = _layer_types(text)
    recurrent = sorted(set(layer_types) & _RECURRENT_LAYER_TYPES)
    if getattr(model_class, "_is_stateful", False) or recurrent:
        marked = f"layer types {recurrent}" if recurrent else "transformers marks the model _is_stateful"
        return (f"recurrent / state-space layers ({marked}): they keep their own states, beside or instead of a "
                "per-layer K/V, which the recurrent cache cannot follow")
    not_plain = sorted({
        t for t in layer_types
        if not (t in DYNAMIC_LAYER_TYPE_MAPPING and DYNAMIC_LAYER_TYPE_MAPPING[t] in _PLAIN_KV_LAYERS)
    })
    if "dummy" in not_plain and "reuse" in (_get(text, "kv_sharing_modes") or ()):
        return ("KV sharing: some layers reuse another layer's keys and values (kv_sharing_modes), which a recurrent "
                "cache does not keep")
    if not_plain:
        return (f"layer types {not_plain}: not one plain key/value cache per attention layer (recurrent, linear, "
                "hybrid or indexed attention, or layers without their own K/V)")
    if model_class is not None and hasattr(model_class, "_can_set_attn_implementation"):
        # transformers' own test: a module with an attention class that never calls the interface
        if not model_class._can_set_attn_implementation():
            return ("its attention does not dispatch through transformers' AttentionInterface (it is computed in the "
                    "model's own code), so the implementation would be ignored")
    module = _modeling_module(model_class)
    if module is not None:
        facts = _source_facts(module.__name__)
        if not facts["readable"]:
            return "its modeling code cannot be read, so whether its attention dispatches is unknown"
    if module is not None and not facts["dispatches"] and not getattr(config, "sub_configs", None):
        # not a wrapper (multimodal) whose text model lives elsewhere: no attention here at all (xLSTM ...)
        return ("its modeling code never calls transformers' AttentionInterface (it has no attention modules that "
                "dispatch, e.g. a recurrent model), so the implementation would be ignored")
    if module is not None and facts["dispatches"]:  # else a wrapper (multimodal) whose text model lives elsewhere
        if facts["caches"]:
            return (f"its modeling code keeps its own cache ({', '.join(facts['caches'])}), not a plain per-layer "
                    "K/V cache")
        if not facts["mask_interface"]:
            return ("it builds its own additive 4D attention mask instead of asking transformers' mask interface "
                    "(masking_utils), so hf_fastattn's functions would not receive the padding mask they take")
        if facts["repeated"]:
            return ("its attention module calls the attention function more than once per forward (e.g. differential "
                    "attention), so a recurrent state would take every key twice")
        if facts["looped"]:
            return ("it runs its layers in loops with a cache slot per loop (layer_idx + offset), not one K/V per "
                    "attention module")
        if facts["position_bias"]:
            return ("its attention adds a position bias to the logits (position_bias=), which the O(N) forms do not "
                    "have and 'sparse' does not take")
        if implementation in SOFTMAX_IMPLEMENTATIONS:
            if facts["sinks"]:
                return (f"attention sinks (s_aux): {implementation!r} computes plain softmax attention and would "
                        "drop the sinks (transformers' sdpa refuses them too)")
            if facts["softcap"] and _get(text, "attn_logit_softcapping", None) is not None:
                return (f"attention logit soft-capping (attn_logit_softcapping={text.attn_logit_softcapping}): "
                        f"{implementation!r} computes plain softmax attention and would drop the cap (transformers' "
                        "sdpa refuses it too); set config.attn_logit_softcapping = None to accept the change")
    return None


def check_compatible(model_class: type | None, config, implementation: str) -> None:
    """Raise a ValueError saying why, unless `implementation` can serve a model of `model_class` with `config`.

    Args:
        model_class: see `incompatibility`.
        config: the model's config.
        implementation: one of hf_fastattn's implementations.

    Raises:
        ValueError: naming the model, the implementation and the reason.
    """
    reason = incompatibility(model_class, config, implementation)
    if reason is not None:
        name = getattr(model_class, "__name__", None) or "this model"
        raise ValueError(
            f"hf_fastattn: attn_implementation={implementation!r} cannot serve {name} "
            f"(model_type={_base_model_type(config)!r}): {reason}. See the README section 'Supported model families'."
        )
