"""The table of attention variants: `register_attention_variant` is the one place a variant is declared.

Every built-in variant ("linear", "fast", "sparse", "mqa"; `registry.py` registers them, one line each) and any third
party's goes through `register_attention_variant(name, attention_fn, mask_fn, options_cls, ...)`. What used to be
parallel tables is derived from this one: transformers' `AttentionInterface` / `AttentionMaskInterface` entries, the
options accepted in `config.fastattn`, the names validated when an implementation is set, the converted-checkpoint
guard (`conversion/modeling.py`), which variants decode with a `RecurrentCache`, which are refused on models that add
terms to the softmax (`compatibility.SOFTMAX_IMPLEMENTATIONS`), the operators timed by `hf-fastattn bench attention`
and the tests' parametrization.

Options: each variant declares a dataclass (peft's config style: every field has a default and
`field(metadata={"help": ...})`; `"state": True` marks the fields that set the meaning of a recurrent state). One model
config keeps one dict, `config.fastattn`, with the keys of any variant (users switch implementations on one config);
a key no registered variant knows is an error, and every variant's part is validated by its class. Two variants may
share a field (`chunk_size`, `backend`) when they give it the same default.

This module imports nothing of the glue files (`*_attention.py`), which import it; so no cycle.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import compatibility

CONFIG_KEY = "fastattn"


@dataclass(frozen=True)
class AttentionVariant:
    """One registered attention variant (see `register_attention_variant` for the fields)."""

    name: str
    attention_fn: Callable
    mask_fn: Callable
    options_cls: type
    recurrent: bool = False
    softmax: bool = False
    prepare_model: Callable | None = None
    benchmarks: Mapping[str, Callable] = field(default_factory=dict)


_VARIANTS: dict[str, AttentionVariant] = {}


def register_attention_variant(
    name: str,
    attention_fn: Callable,
    mask_fn: Callable,
    options_cls: type,
    *,
    recurrent: bool = False,
    softmax: bool = False,
    prepare_model: Callable | None = None,
    benchmarks: Mapping[str, Callable] | None = None,
) -> AttentionVariant:
    """Declare an attention variant and register it with transformers, so that
    `from_pretrained(..., attn_implementation=name)` and `model.set_attn_implementation(name)` run it.

    Args:
        name: the `attn_implementation` name. Must not be registered yet, nor one of transformers' own.
        attention_fn: `fn(module, query [B, H, Nq, D], key [B, Hkv, N, D], value [B, Hkv, N, Dv], attention_mask,
            dropout=0.0, scaling=None, is_causal=None, **kwargs) -> (out [B, Nq, H, Dv], None)`, the contract of
            `transformers.integrations.sdpa_attention.sdpa_attention_forward`; read the options with
            `variant_options(module.config, name)`.
        mask_fn: the mask builder registered with `AttentionMaskInterface`: `common.padding_mask` (the 2D padding
            mask `[B, N]`, for O(N) variants) or one of transformers' (`masking_utils.sdpa_mask`, a 4D boolean mask).
        options_cls: a dataclass of the variant's options (every field with a default and a `metadata={"help": ...}`);
            an optional method `check_model_config(self, config)` raises for a model the values cannot serve.
        recurrent: causal models running it decode with a `RecurrentCache` (the function then finds the cache layer
            on `module.fastattn_recurrent_layer`; see `hf_fastattn.integration.recurrent`).
        softmax: it computes the model's softmax attention, so models that add terms to the softmax (soft-capping,
            sinks) are refused (`compatibility`, rule 5).
        prepare_model: called with the model whenever the implementation is set (construction,
            `set_attn_implementation`), e.g. to add module hooks; idempotent.
        benchmarks: operator calls `fn(q, k, v) -> out` (causal, `[1, H, N, D]`) timed by `hf-fastattn bench
            attention`, by row label.

    Returns:
        The registered `AttentionVariant`.

    Raises:
        ValueError: a name already registered (`unregister_attention_variant` first) or one of transformers' own, an
            options class that is not a dataclass, a field without a default or help, or a shared field with another
            default than the registered variants give it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an attention variant's name must be a non-empty str, got {name!r}")
    if name in _VARIANTS:
        raise ValueError(
            f"attention variant {name!r} is already registered (registered: {list(_VARIANTS)}); choose another name "
            "or call unregister_attention_variant first"
        )
    if name == "eager" or name in AttentionInterface._global_mapping:
        raise ValueError(
            f"attention variant {name!r} would replace transformers' own implementation of that name (or one "
            "registered with AttentionInterface directly); choose another name"
        )
    for what, fn in (("attention_fn", attention_fn), ("mask_fn", mask_fn)):
        if not callable(fn):
            raise ValueError(f"attention variant {name!r}: {what} must be callable, got {fn!r}")
    _check_options_cls(name, options_cls)
    variant = AttentionVariant(
        name, attention_fn, mask_fn, options_cls, bool(recurrent), bool(softmax), prepare_model,
        MappingProxyType(dict(benchmarks or {})),
    )
    _VARIANTS[name] = variant
    _register_with_transformers(variant)
    return variant


def unregister_attention_variant(name: str) -> None:
    """Remove a variant registered with `register_attention_variant` (tests, notebooks); transformers then no longer
    knows the name either."""
    if name not in _VARIANTS:
        raise ValueError(f"attention variant {name!r} is not registered (registered: {list(_VARIANTS)})")
    del _VARIANTS[name]
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    compatibility.SOFTMAX_IMPLEMENTATIONS.discard(name)


def _register_with_transformers(variant: AttentionVariant) -> None:
    AttentionInterface.register(variant.name, variant.attention_fn)
    AttentionMaskInterface.register(variant.name, variant.mask_fn)
    if variant.softmax:
        compatibility.SOFTMAX_IMPLEMENTATIONS.add(variant.name)


def register_with_transformers() -> None:
    """Register every variant with `AttentionInterface` and `AttentionMaskInterface` again (idempotent)."""
    for variant in _VARIANTS.values():
        _register_with_transformers(variant)


def _check_options_cls(name: str, options_cls: type) -> None:
    if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
        raise ValueError(f"attention variant {name!r}: options_cls must be a dataclass, got {options_cls!r}")
    known = all_option_fields()
    for f in dataclasses.fields(options_cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(
                f"attention variant {name!r}: option {f.name!r} needs a default (config.fastattn may omit it)"
            )
        if not f.metadata.get("help"):
            raise ValueError(f"attention variant {name!r}: option {f.name!r} needs field(metadata={{'help': ...}})")
        if f.name in known and _default(known[f.name]) != _default(f):
            raise ValueError(
                f"attention variant {name!r}: option {f.name!r} defaults to {_default(f)!r}, but a registered variant "
                f"gives it {_default(known[f.name])!r}; one config.fastattn key means one thing: use another name"
            )


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def get_variant(name: str) -> AttentionVariant:
    """The registered variant `name` (ValueError naming the registered ones if there is none)."""
    if name not in _VARIANTS:
        raise ValueError(f"no hf_fastattn attention variant {name!r}; registered: {list(_VARIANTS)}")
    return _VARIANTS[name]


def is_variant(name: Any) -> bool:
    """Whether `name` is a registered hf_fastattn attention variant."""
    return isinstance(name, str) and name in _VARIANTS


def variant_names() -> tuple[str, ...]:
    """The registered variants' names, in registration order (the built-ins: "linear", "fast", "sparse", "mqa")."""
    return tuple(_VARIANTS)


def recurrent_variant_names() -> tuple[str, ...]:
    """The variants registered with `recurrent=True` (the built-ins: "linear", "fast")."""
    return tuple(name for name, variant in _VARIANTS.items() if variant.recurrent)


def benchmark_entries() -> dict[str, Callable]:
    """Every variant's operator calls for `hf-fastattn bench attention`, by row label, in registration order."""
    return {label: fn for variant in _VARIANTS.values() for label, fn in variant.benchmarks.items()}


def all_option_fields() -> dict[str, dataclasses.Field]:
    """Every registered option by name (a field two variants share appears once), in registration order."""
    out: dict[str, dataclasses.Field] = {}
    for variant in _VARIANTS.values():
        for f in dataclasses.fields(variant.options_cls):
            out.setdefault(f.name, f)
    return out


def parse_options(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a `config.fastattn` dict: every key known to some variant, every variant's part valid.

    Returns:
        Each variant's options instance, by variant name.

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or an invalid value (the variant's class says).
    """
    raw = dict(raw or {})
    valid = list(all_option_fields())
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"unknown fastattn option(s) {unknown}; valid options are {valid}")
    out = {}
    for name, variant in _VARIANTS.items():
        names = {f.name for f in dataclasses.fields(variant.options_cls)}
        out[name] = variant.options_cls(**{k: v for k, v in raw.items() if k in names})
    return out


@functools.lru_cache(maxsize=256)
def _parse_cached(items: tuple, variants: tuple[tuple[str, type], ...]) -> dict[str, Any]:
    return parse_options(dict(items))


def _parse_config(config) -> dict[str, Any]:
    raw = getattr(config, CONFIG_KEY, None) or {}
    try:  # parsed once per distinct option dict and table of variants: every attention call asks
        return _parse_cached(tuple(sorted(raw.items())), tuple((n, v.options_cls) for n, v in _VARIANTS.items()))
    except TypeError:  # an unhashable value: validate without the cache (the variant's class says what is wrong)
        return parse_options(raw)


def variant_options(config, name: str):
    """The validated options of variant `name` in `config.fastattn` (all of its keys are validated, every variant's).

    Args:
        config: a model config (or anything with a `fastattn` dict attribute).
        name: a registered variant.

    Returns:
        An instance of the variant's `options_cls`.
    """
    get_variant(name)
    return _parse_config(config)[name]


def merged_options_class() -> type:
    """The dataclass of every registered option (`FastAttnOptions` when only the built-ins are registered): one field
    per option, validated by each variant's class; `from_dict` refuses unknown keys."""
    return _merged(tuple((name, v.options_cls) for name, v in _VARIANTS.items()))


@functools.lru_cache(maxsize=16)
def _merged(variants: tuple[tuple[str, type], ...]) -> type:
    classes = [cls for _, cls in variants]
    fields_by_name: dict[str, dataclasses.Field] = {}
    owners: dict[str, list[str]] = {}
    for name, cls in variants:
        for f in dataclasses.fields(cls):
            fields_by_name.setdefault(f.name, f)
            owners.setdefault(f.name, []).append(f'"{name}"')
    spec = [
        (name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for name, f in fields_by_name.items()
    ]

    def __post_init__(self):
        for cls in classes:
            cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def from_dict(cls, options: Mapping[str, Any] | None):
        options = dict(options or {})
        valid = list(fields_by_name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown fastattn option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    doc = ["Options of the hf_fastattn attention variants, stored as `config.fastattn` (all variants' keys in one",
           "dict; each variant reads its own: `variant_options(config, name)`).", "", "Args:"]
    doc += [f"    {name}: ({', '.join(owners[name])}) {f.metadata['help']}" for name, f in fields_by_name.items()]
    merged = dataclasses.make_dataclass(
        "FastAttnOptions", spec,
        namespace={"__post_init__": __post_init__, "from_dict": classmethod(from_dict), "__doc__": "\n".join(doc)},
    )
    merged.__module__ = __name__
    return merged


def parse_merged(raw: Mapping[str, Any] | None):
    """`config.fastattn` as one instance of `merged_options_class()` (validated)."""
    return merged_options_class().from_dict(raw)
