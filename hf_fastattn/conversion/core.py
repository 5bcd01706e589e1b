"""`convert(model, method, **options)` and the registry of conversion methods (peft's `register_peft_method` style).

A method is a config dataclass plus two functions:
- `prepare(model, config, family)`: one-off weight surgery at conversion time (mean pooling of K/V). Optional.
- `attach(model, config, family)`: add the new modules (learned feature maps) and set the attention implementation
  and its options. Also run when a saved converted checkpoint is instantiated, before its weights are loaded.

The method name and its options are stored in `config.fastattn_conversion`, the attention options in
`config.fastattn`; see `hf_fastattn.conversion.modeling` for how checkpoints round-trip.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from .families import Family, attention_modules, family_of

CONVERSION_KEY = "fastattn_conversion"


@dataclass
class MethodConfig:
    """Base of the per-method option dataclasses: `from_options` rejects unknown keys listing the valid ones."""

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> MethodConfig:
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for conversion method {method!r}; valid options are {valid}"
            )
        return cls(**options)

    def validate(self) -> None:
        """Raise ValueError naming the field, the value and what is allowed."""


@dataclass(frozen=True)
class ConversionMethod:
    name: str
    config_class: type[MethodConfig]
    attach: Callable[[nn.Module, MethodConfig, Family], None]
    prepare: Callable[[nn.Module, MethodConfig, Family], None] | None = None
    # whether the result needs hf_fastattn to load (False: a standard transformers checkpoint, e.g. GQA Llama)
    needs_plugin: Callable[[Family], bool] = lambda family: True


CONVERSION_METHODS: dict[str, ConversionMethod] = {}


def register_conversion_method(
    name: str,
    config_class: type[MethodConfig],
    attach: Callable,
    prepare: Callable | None = None,
    needs_plugin: Callable[[Family], bool] | None = None,
) -> None:
    """Register a conversion method under `name` (replaces one of the same name)."""
    CONVERSION_METHODS[name] = ConversionMethod(
        name, config_class, attach, prepare, needs_plugin or (lambda family: True)
    )


def get_method(method: str) -> ConversionMethod:
    from . import methods  # noqa: F401  (registers the built-in methods)

    if method not in CONVERSION_METHODS:
        raise ValueError(
            f"unknown conversion method {method!r}; valid methods are {sorted(CONVERSION_METHODS)}"
        )
    return CONVERSION_METHODS[method]


def method_config(method: str, **options) -> MethodConfig:
    """The validated option dataclass of `method`."""
    cfg = get_method(method).config_class.from_options(method, options)
    cfg.validate()
    return cfg


def conversion_spec(model_or_config) -> dict[str, Any] | None:
    """The `config.fastattn_conversion` dict of a converted model or config, or None."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, CONVERSION_KEY, None)


def convert(
    model: nn.Module, method: str, *, inplace: bool = False, recipe: str | None = None, **options
) -> nn.Module:
    """Convert a pretrained transformers model to an efficient-attention form.

    Args:
        model: a transformers model of any family the compatibility rule accepts (any head class); what conversion
            needs is read from it (`families.family_of`).
        method: "t2r", "hedgehog", "linear", "fast", "mqa" or "gqa" (see `CONVERSION_METHODS`).
        inplace: modify `model` itself; by default a deep copy is converted and `model` is left untouched.
        recipe: take the conversion options of this `recipes.RECIPES` entry ("default": the method's default recipe,
            what `hf-fastattn convert` uses; an encoder's without the hybrid), `**options` replacing them; None: the
            method's own option defaults.
            To convert and uptrain by a recipe: `recipes.convert_with_recipe`.
        **options: the method's options (e.g. `feature_dim=64` for "t2r", `num_key_value_heads=2` for "gqa",
            `hybrid=True` for "hedgehog").

    Returns:
        The converted model. Only attention changes: new feature-map parameters (t2r, hedgehog), the attention
        implementation, or pooled K/V projections (mqa, gqa); every other weight is bit-identical. Uptrain it with
        `hf_fastattn.conversion.distill`, and save it with `save_pretrained` (reload after `import hf_fastattn`).

    Raises:
        ValueError: unknown method or option, invalid option value, unsupported or already converted model.
    """
    spec = get_method(method)
    if recipe is not None:
        from .recipes import make_plan

        plan = make_plan(method, None if recipe == "default" else recipe, 0, causal=family_of(model).causal)
        options = {**plan.options, **options}
    cfg = method_config(method, **options)
    family = family_of(model)
    from .modeling import ConvertedModel, mark_converted

    if isinstance(model, ConvertedModel):
        raise ValueError(
            f"this model is already converted (method {conversion_spec(model)['method']!r}); convert the original"
        )
    attention_modules(model, family)  # fail early on a model without attention modules
    if not inplace:
        model = copy.deepcopy(model)
    if spec.prepare is not None:
        spec.prepare(model, cfg, family)
    spec.attach(model, cfg, family)
    setattr(model.config, CONVERSION_KEY, {"method": method, **asdict(cfg)})
    if spec.needs_plugin(family):
        mark_converted(model)
    return model


def attach_from_config(model: nn.Module) -> None:
    """Re-create the modules of a saved conversion on a freshly built model (weights are loaded afterwards)."""
    spec = dict(conversion_spec(model) or {})
    method = spec.pop("method", None)
    if method is None:
        raise ValueError(
            "hf_fastattn: this config has no fastattn_conversion entry; it is not a converted checkpoint"
        )
    cfg = method_config(method, **spec)
    get_method(method).attach(model, cfg, family_of(model))
