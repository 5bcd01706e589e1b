"""The built-in attention variants "linear", "fast", "sparse" and "mqa", registered with transformers' attention and
mask interfaces (one `register_attention_variant` line each, below), and the option API: `configure`, `get_options`,
`FastAttnOptions` (the merged view of every variant's options), `validate_implementation`.

Each variant's transformers glue is one file, a function with the contract of
`transformers.integrations.sdpa_attention.sdpa_attention_forward`:
`fn(module, query [B, H, Nq, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv], attention_mask, dropout, scaling,
is_causal, **kwargs) -> (out [B, Nq, H, Dv], None)`, called after RoPE and after the K/V cache update:
`linear_attention.py`, `fast_attention.py`, `sparse_attention.py`, `mqa_attention.py`, `hybrid_attention.py` (the
sliding-window hybrid, "linear" with `window`). The table itself is `variants.py`, which they import; recurrent
decoding (cache + module hooks) is `recurrent.py`.

Masks: "mqa" uses transformers' own `sdpa_mask`. The O(N) variants register `common.padding_mask`, which hands the
attention function the 2D padding mask `[B, N]` itself (or None): an N x N mask would defeat linear memory, and
causality comes from the module. Without a registered mask function transformers passes `attention_mask=None`
and a padded batch silently attends to its padding.

Options live in `model.config.fastattn` (a dict, saved in config.json) and are validated by each variant's options
dataclass (`LinearOptions`, `FastOptions`, `SparseOptions`, `MqaOptions`; `FastAttnOptions` merges them).

Validation happens when an implementation is set, not at the first forward: `validate_implementation` (called by
the hooks of `hf_fastattn.integration.patching` on `from_pretrained` / `from_config`, `set_attn_implementation`,
and by `configure`) refuses models the implementation cannot serve (`hf_fastattn.integration.compatibility`: a rule
read from transformers' flags and the model's code, not a list of names), invalid options and a `kv_groups` that
does not divide the model's K/V heads, before a large model has loaded its weights.
"""

from __future__ import annotations

import difflib
import functools

from transformers import PreTrainedConfig
from transformers.masking_utils import sdpa_mask

from .common import _is_causal, _key_padding, check_supported, padding_mask  # noqa: F401 (re-exported)
from .compatibility import check_compatible
from .fast_attention import BENCHMARKS as FAST_BENCHMARKS
from .fast_attention import FastOptions, fast_attention_forward
from .hybrid_attention import (  # noqa: F401 (re-exported)
    _HYBRID_PREFILL_PIECE,
    _hybrid_forward,
    _hybrid_recurrent_forward,
    _hybrid_step,
)
from .linear_attention import BENCHMARKS as LINEAR_BENCHMARKS
from .linear_attention import (  # noqa: F401 (re-exported)
    LinearOptions,
    _linear_like,
    _recurrent_forward,
    _suffix_queries,
    _with_prefix_state,
    feature_map_of,
    linear_attention_forward,
)
from .mqa_attention import (  # noqa: F401 (re-exported)
    POOLED_BEFORE_NORM,
    MqaOptions,
    _pool_keys_before_norm,
    check_kv_groups,
    enable_mqa_key_pooling,
    kv_heads,
    mean_pool_heads,
    mqa_attention_forward,
)
from .sparse_attention import BENCHMARKS as SPARSE_BENCHMARKS
from .sparse_attention import SparseOptions, sparse_attention_forward
from .variants import (  # noqa: F401 (re-exported)
    CONFIG_KEY,
    AttentionVariant,
    get_variant,
    is_variant,
    merged_options_class,
    parse_merged,
    parse_options,
    register_attention_variant,
    register_with_transformers,
    unregister_attention_variant,
    variant_names,
    variant_options,
)

# the built-in variants: one line each
register_attention_variant("linear", linear_attention_forward, padding_mask, LinearOptions, recurrent=True,
                           benchmarks=LINEAR_BENCHMARKS)
register_attention_variant("fast", fast_attention_forward, padding_mask, FastOptions, recurrent=True,
                           benchmarks=FAST_BENCHMARKS)
register_attention_variant("sparse", sparse_attention_forward, padding_mask, SparseOptions, softmax=True,
                           benchmarks=SPARSE_BENCHMARKS)
register_attention_variant("mqa", mqa_attention_forward, sdpa_mask, MqaOptions, softmax=True,
                           prepare_model=enable_mqa_key_pooling)

# The options of every built-in variant in one dataclass (field order: by variant, then by field). A variant registered
# later adds its fields to `merged_options_class()`, which `configure` and `get_options` return.
FastAttnOptions = merged_options_class()


def configure(target, **options) -> FastAttnOptions:
    """Validate `options` and store them in `config.fastattn` of a model or config (merged with what is there).

    Example: `hf_fastattn.configure(model, order=1, temperature=2.0)`; they are saved by `save_pretrained`.

    Args:
        target: a model (its `config` is changed) or a config.
        **options: fields of `FastAttnOptions` (any registered variant's options).

    Returns:
        The merged, validated `FastAttnOptions`.

    Raises:
        ValueError: an unknown option or an invalid value, a `kv_groups` that does not divide the model's K/V heads,
            or (when the model already runs an hf_fastattn implementation) a model it cannot serve. Nothing is
            stored then.
    """
    config = target if isinstance(target, PreTrainedConfig) else target.config
    merged = {**(getattr(config, CONFIG_KEY, None) or {}), **options}
    parts = parse_options(merged)
    for part in parts.values():  # e.g. "mqa": kv_groups must divide the model's K/V heads
        if hasattr(part, "check_model_config") and any(f in merged for f in part.__dataclass_fields__):
            part.check_model_config(config)
    implementation = getattr(config, "_attn_implementation", None)
    if is_variant(implementation):
        check_compatible(None if isinstance(target, PreTrainedConfig) else type(target), config, implementation)
    parsed = parse_merged(merged)
    setattr(config, CONFIG_KEY, {k: merged[k] for k in parsed.__dataclass_fields__ if k in merged})
    return parsed


def get_options(config) -> FastAttnOptions:
    """The validated options of `config`, every variant's in one `FastAttnOptions` (parsed once per distinct option
    dict). The glue of one variant reads its own part: `variant_options(config, name)`."""
    raw = getattr(config, CONFIG_KEY, None) or {}
    try:
        return _parse_options(tuple(sorted(raw.items())), merged_options_class())
    except TypeError:  # an unhashable value: validate without the cache (from_dict says what is wrong)
        return parse_merged(raw)


@functools.lru_cache(maxsize=256)
def _parse_options(items: tuple, cls: type) -> FastAttnOptions:
    return cls.from_dict(dict(items))


def validate_implementation(config, implementation: str, model_class: type | None = None) -> FastAttnOptions:
    """Check, when `implementation` is set on a model with `config`, what its first forward would otherwise find.

    Args:
        config: the model's config (options in `config.fastattn`).
        implementation: a registered variant (`variant_names()`).
        model_class: the model's class, whose code and flags the compatibility rule reads (None: the config alone).

    Returns:
        The validated options.

    Raises:
        ValueError: a model the implementation cannot serve (`compatibility.incompatibility` says why), an invalid
            option, or what the variant's options refuse for this model (`check_model_config`: "mqa", a `kv_groups`
            that does not divide the model's key/value heads); the message names the valid values.
    """
    check_compatible(model_class, config, implementation)
    options = get_options(config)
    part = variant_options(config, implementation)
    if hasattr(part, "check_model_config"):
        part.check_model_config(config)
    return options


def unknown_implementation_hint(name: str, valid: list[str]) -> str:
    """The sentence added to transformers' error for an unknown `attn_implementation`: hf_fastattn's names (which
    transformers does not list) and the closest valid names, if any.

    Args:
        name: the name asked for.
        valid: every valid name (transformers' and those registered).

    Returns:
        One or two sentences, e.g. 'hf_fastattn also registers "linear", ... Did you mean "linear"?'.
    """
    ours = variant_names()
    quoted = [f'"{n}"' for n in ours]
    hint = f"hf_fastattn also registers {', '.join(quoted)}."
    # case-insensitive: "Linear" is close to "linear"
    lowered = {}
    for candidate in [*ours, *valid]:
        lowered.setdefault(candidate.lower(), candidate)
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    if close:
        suggestions = [f'"{lowered[c]}"' for c in close]
        hint += f" Did you mean {' or '.join(suggestions)}?"
    return hint


def register() -> None:
    """Register every variant with `AttentionInterface` and `AttentionMaskInterface` again (idempotent; importing
    this module registers the built-ins)."""
    register_with_transformers()


def __getattr__(name: str):
    # the tables this module used to keep, now views of the variant table (they include variants registered later)
    if name == "IMPLEMENTATIONS":
        return variant_names()
    if name == "ATTENTION_FUNCTIONS":
        return {n: get_variant(n).attention_fn for n in variant_names()}
    if name == "MASK_FUNCTIONS":
        return {n: get_variant(n).mask_fn for n in variant_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
