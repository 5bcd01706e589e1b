"""`convert(model, method, **options)`: convert a pretrained transformers model by a registered conversion method.

The methods live in `methods/` (one module each) and register themselves in `registry.py`, which this module reads;
the registry's names are re-exported here (their home before 0.2). The method name and its options are stored in
`config.fastattn_conversion`, the attention options in `config.fastattn`; see `hf_fastattn.conversion.modeling` for
how checkpoints round-trip.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

from torch import nn

from . import methods  # noqa: F401  (registers the built-in methods)
from .families import attention_modules, family_of
from .modeling import ConvertedModel, mark_converted
from .registry import (  # noqa: F401  (re-exported: their home before the registry moved below convert())
    CONVERSION_KEY,
    CONVERSION_METHODS,
    ConversionMethod,
    MethodConfig,
    attach_from_config,
    conversion_spec,
    get_method,
    method_config,
    register_conversion_method,
)


def convert(
    model: nn.Module,
    method: str,
    *,
    inplace: bool = False,
    recipe: str | None = None,
    calibration_data=None,
    **options,
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
            To convert and uptrain by a recipe: `runner.convert_with_recipe`.
        calibration_data: token id batches (tensors `[B, T]` or `[T]`, or dicts with "input_ids" and an optional
            "attention_mask", e.g. a few rows of the training dataset) run through the original model for the
            statistics of what its layers see; required by the options that fit to them (init="calibrated" of
            "mqa" / "gqa") and refused by the others. Their longest sequence is the context the fit serves: rotary
            pairs that turn less than half a radian over it are fit as unrotated dims (`kv_pooling.fit_kv`), so
            calibrate on sequences as long as those the model will see. `runner.convert_with_recipe` passes the
            training data's first blocks.
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
    if isinstance(model, ConvertedModel):
        raise ValueError(
            f"this model is already converted (method {conversion_spec(model)['method']!r}); convert the original"
        )
    attention_modules(model, family)  # fail early on a model without attention modules
    if not inplace:
        model = copy.deepcopy(model)
    calibrated = cfg.needs_calibration()
    if calibrated and calibration_data is None:
        raise ValueError(
            f"conversion method {method!r} with options {asdict(cfg)} fits to the original model's activations: "
            "pass calibration_data= (token id batches, e.g. a few blocks of the training text)"
        )
    if not calibrated and calibration_data is not None:
        raise ValueError(
            f"conversion method {method!r} with options {asdict(cfg)} does not use calibration_data "
            '(only init="calibrated" of "mqa" / "gqa" does); leave it out'
        )
    if spec.prepare is not None:
        spec.prepare(model, cfg, family, *([calibration_data] if calibrated else []))
    spec.attach(model, cfg, family)
    setattr(model.config, CONVERSION_KEY, {"method": method, **asdict(cfg)})
    if spec.needs_plugin(family):
        mark_converted(model)
    return model


__all__ = [
    "CONVERSION_KEY",
    "CONVERSION_METHODS",
    "ConversionMethod",
    "MethodConfig",
    "attach_from_config",
    "conversion_spec",
    "convert",
    "get_method",
    "method_config",
    "register_conversion_method",
]
