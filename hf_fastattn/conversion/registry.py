"""The registry of conversion methods (peft's `register_peft_method` style), below `convert()`: a method registers
itself here by name, `convert()` (`core.py`) and the checkpoint loader (`modeling.py`) read it, so no method imports
its caller.

A method is a config dataclass plus two functions:
- `prepare(model, config, family)`: one-off weight surgery at conversion time (mean pooling of K/V). Optional. A
  config whose `needs_calibration()` is true gets `prepare(model, config, family, calibration_data)`.
- `attach(model, config, family)`: add the new modules (learned feature maps) and set the attention implementation
  and its options. Also run when a saved converted checkpoint is instantiated, before its weights are loaded.

The built-in methods (`methods/`) register when `hf_fastattn.conversion` is imported (its `core` imports them).
The method name and its options are stored in `config.fastattn_conversion`, the attention options in
`config.fastattn`; see `hf_fastattn.conversion.modeling` for how checkpoints round-trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from .families import Family, family_of

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

    def needs_calibration(self) -> bool:
        """Whether `prepare` reads calibration data (`convert(..., calibration_data=...)`): a fit to the inputs'
        statistics, e.g. "mqa" with init="calibrated"."""
        return False


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
    """The registered method `method` (the built-ins are registered once `hf_fastattn.conversion` is imported)."""
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


__all__ = [
    "CONVERSION_KEY",
    "CONVERSION_METHODS",
    "ConversionMethod",
    "MethodConfig",
    "attach_from_config",
    "conversion_spec",
    "get_method",
    "method_config",
    "register_conversion_method",
]
