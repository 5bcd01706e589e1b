"""Checks when an hf_fastattn implementation is set, and (re-exported from `cache.py`, where they now live with the
`RecurrentCache` they serve, so that neither module imports the other) the recurrent-decoding hooks:
`enable_recurrent_decoding` (attention-module hooks that hand the registered function its cache layer) and
`install_generate_hook` (generate makes a `RecurrentCache` for causal models of a variant registered with
`recurrent=True`: "linear", "fast", the sliding-window hybrid).

`install_attn_implementation_checks` wraps four `PreTrainedModel` methods so that setting an implementation is checked
when it is set (`registry.validate_implementation`), not at the first forward of a fully loaded model:

- `_check_and_adjust_attn_implementation` (run by every model's `__init__`, so by `from_pretrained` and
  `from_config` before any weight loads, and by `set_attn_implementation`): validates hf_fastattn's names.
- `set_attn_implementation`: validates before delegating. Models that do not dispatch through `AttentionInterface`
  (Bloom, MPT) would otherwise accept the name with a logged warning and keep their own softmax attention. What is
  checked is the compatibility rule of `hf_fastattn.integration.compatibility`.
- `get_correct_attn_implementation`: transformers' error for an unknown name lists only its own names; ours are
  added, with the closest valid names ("Linear" -> "linear").
- `post_init` (the end of every model's `__init__`): runs the variant's `prepare_model` ("mqa" on Qwen3 needs its
  key-norm hook, `mqa_attention.enable_mqa_key_pooling`); `set_attn_implementation` runs it too.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import (  # noqa: F401 (re-exported: the recurrent hooks live with the cache, see cache.py)
    _arm,
    _attention_modules,
    _disarm,
    _prepare_cache_for_generation,
    enable_recurrent_decoding,
    install_generate_hook,
    uses_recurrent_state,
)
from .registry import unknown_implementation_hint, validate_implementation
from .variants import get_variant, is_variant, recurrent_variant_names


def __getattr__(name: str):
    # the table this module used to keep, now a view of the variant table
    if name == "RECURRENT_IMPLEMENTATIONS":
        return recurrent_variant_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _prepare(model) -> None:
    """Run the `prepare_model` of the variant the model now runs (e.g. "mqa" hooks Qwen3's key norm)."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if is_variant(implementation) and get_variant(implementation).prepare_model is not None:
        get_variant(implementation).prepare_model(model)


_original_check_and_adjust = PreTrainedModel._check_and_adjust_attn_implementation
_original_get_correct = PreTrainedModel.get_correct_attn_implementation
_original_set_attn_implementation = PreTrainedModel.set_attn_implementation
_original_post_init = PreTrainedModel.post_init


@functools.wraps(_original_check_and_adjust)
def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
    applicable = _original_check_and_adjust(self, attn_implementation, *args, **kwargs)
    if is_variant(applicable):
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
    if is_variant(requested):
        # before transformers' own, which accepts the name with only a logged warning where it would be ignored
        validate_implementation(self.config, requested, type(self))
    _original_set_attn_implementation(self, attn_implementation, *args, **kwargs)
    _prepare(self)


@functools.wraps(_original_post_init)
def _post_init(self, *args, **kwargs):
    result = _original_post_init(self, *args, **kwargs)
    _prepare(self)
    return result


def install_attn_implementation_checks() -> None:
    """Check hf_fastattn's implementations when they are set, list them in transformers' unknown-name error, and
    run each variant's `prepare_model` ("mqa") (done once by `import hf_fastattn`; see the module docstring)."""
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    PreTrainedModel.get_correct_attn_implementation = _get_correct_attn_implementation
    PreTrainedModel.set_attn_implementation = _set_attn_implementation
    PreTrainedModel.post_init = _post_init
