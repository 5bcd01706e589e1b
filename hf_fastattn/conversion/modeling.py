"""Persistence of converted models: distinct `model_type`s registered with the Auto classes.

A converted model has `model_type = "hf_fastattn_<family>"` (e.g. "hf_fastattn_llama"), its architecture class
`HfFastattn<Arch>` (e.g. "HfFastattnLlamaForCausalLM"), the method and options in `config.fastattn_conversion`
and the attention options in `config.fastattn`. Importing `hf_fastattn.conversion` (done by `import hf_fastattn`)
generates, for each supported family, a config subclass and model subclasses of the family's classes and registers
them with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` / `AutoModelForMaskedLM`. Their `__init__` sets the
attention implementation and re-creates the feature maps before the weights load, so `from_pretrained` restores
the converted model exactly.

Loading without the plugin. `config.json` stores the model type with a hint for the user (`saved_model_type`):

    "model_type": "hf_fastattn_llama (this checkpoint was converted by hf_fastattn: pip install hf_fastattn and
                   import hf_fastattn)"

Every entry point that reads a checkpoint (`AutoConfig`, `AutoModel*.from_pretrained`, `pipeline(model=path)`) first
looks the model type up in transformers' table and, not finding it, raises `ValueError: The checkpoint you are trying
to load has model type `<that string>` but Transformers does not recognize this architecture...`: the user reads the
hint inside transformers' own message (which goes on to suggest upgrading transformers). No model is built, so no
weight is dropped silently. Loading through a family class (`LlamaForCausalLM.from_pretrained`) fails too: config.json
stores `attn_implementation = "hf_fastattn_<impl>"`, which transformers rejects (see `_config_to_dict`). An `auto_map`
entry (remote code) was not used: without `trust_remote_code` transformers answers with its own remote-code message
(or an interactive prompt) before it reads the model type, and ours would not show.

After `import hf_fastattn` both the hinted type and the plain "hf_fastattn_<family>" (checkpoints saved before the
hint) are registered; in memory `config.model_type` is always the plain one.

Standard checkpoints (a GQA-pooled Llama) are not marked: they keep their model type and load anywhere.
"""

from __future__ import annotations

import importlib

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..integration.variants import is_variant
from .families import CONVERTED_PREFIX, FAMILIES, base_model_type

HINT = "this checkpoint was converted by hf_fastattn: pip install hf_fastattn and import hf_fastattn"


def saved_model_type(model_type: str) -> str:
    """The model type written to config.json for the converted `model_type`: it carries `HINT`, which transformers
    prints when it does not know the type (hf_fastattn not imported)."""
    return f"{model_type} ({HINT})"

# family -> (transformers module, config class, [(model class, Auto class)])
_FAMILY_CLASSES = {
    "llama": (
        "llama",
        "LlamaConfig",
        [("LlamaModel", AutoModel), ("LlamaForCausalLM", AutoModelForCausalLM)],
    ),
    "mistral": (
        "mistral",
        "MistralConfig",
        [("MistralModel", AutoModel), ("MistralForCausalLM", AutoModelForCausalLM)],
    ),
    "qwen2": (
        "qwen2",
        "Qwen2Config",
        [("Qwen2Model", AutoModel), ("Qwen2ForCausalLM", AutoModelForCausalLM)],
    ),
    "qwen3": (
        "qwen3",
        "Qwen3Config",
        [("Qwen3Model", AutoModel), ("Qwen3ForCausalLM", AutoModelForCausalLM)],
    ),
    "gpt2": ("gpt2", "GPT2Config", [("GPT2Model", AutoModel), ("GPT2LMHeadModel", AutoModelForCausalLM)]),
    "bert": ("bert", "BertConfig", [("BertModel", AutoModel), ("BertForMaskedLM", AutoModelForMaskedLM)]),
}


class ConvertedModel:
    """Marker mixin of the generated converted-model classes."""


_CONFIG_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


_ATTN_PROPERTY = PretrainedConfig._attn_implementation


def _set_attn_implementation(self, value):
    # config.json stores "hf_fastattn_linear" (see `_config_to_dict`); the registered name is "linear"
    if isinstance(value, str):
        value = value.removeprefix(CONVERTED_PREFIX)
    _ATTN_PROPERTY.fset(self, value)


def _config_to_dict(self) -> dict:
    # "attn_implementation" in config.json is read by every config class: a converted checkpoint loaded through the
    # plain class (LlamaForCausalLM.from_pretrained) without hf_fastattn then fails on "hf_fastattn_linear" instead
    # of running softmax attention with the learned maps dropped
    out = super(type(self), self).to_dict()
    impl = self._attn_implementation
    if is_variant(impl):  # any registered variant, a third party's too
        out["attn_implementation"] = CONVERTED_PREFIX + impl
    out["model_type"] = saved_model_type(type(self).model_type)
    return out


class _ModelType:
    """The `model_type` of a converted config class: the plain "hf_fastattn_<family>" on the class and on every
    instance. `from_dict` passes config.json's hinted type to `__init__`, which would otherwise store it on the
    instance; that write is accepted only for the forms this class reads."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None) -> str:
        return self.name

    def __set__(self, obj, value) -> None:
        if value not in (self.name, saved_model_type(self.name)):
            raise ValueError(
                f"{type(obj).__name__} has model_type {self.name!r}, got {value!r}"
            )


def _get_config_dict_of(base: type[PretrainedConfig]):
    # `XConfig.from_pretrained` compares config.json's model_type with the class's and warns on a mismatch
    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = base.get_config_dict.__func__(cls, *args, **kwargs)
        if config_dict.get("model_type") == saved_model_type(cls.model_type):
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    return get_config_dict


def converted_config_class(base: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """The config subclass of `base` with model_type "hf_fastattn_<family>" (generated once)."""
    if base not in _CONFIG_CLASSES:
        model_type = CONVERTED_PREFIX + base.model_type
        _CONFIG_CLASSES[base] = type(
            f"HfFastattn{base.__name__}",
            (base,),
            {
                "model_type": _ModelType(model_type),
                "__module__": __name__,
                "_attn_implementation": property(_ATTN_PROPERTY.fget, _set_attn_implementation),
                "to_dict": _config_to_dict,
                "get_config_dict": _get_config_dict_of(base),
            },
        )
    return _CONFIG_CLASSES[base]


def _converted_init(self, config, *args, **kwargs):
    from .core import conversion_spec

    spec = conversion_spec(config)
    if not spec:
        raise ValueError(
            f"{type(self).__name__} needs a config with a fastattn_conversion entry (a converted model)"
        )
    cls = _converted_base(type(self))
    cls.__init__(self, config, *args, **kwargs)
    from .core import attach_from_config

    attach_from_config(self)


def _converted_base(cls: type) -> type:
    for klass in cls.__mro__:
        if klass in _MODEL_CLASSES:
            return klass
    raise TypeError(f"{cls.__name__} is not a converted-model class")


def converted_model_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The subclass of a transformers model class used for converted models of that class (generated once)."""
    if base not in _MODEL_CLASSES:
        config_class = converted_config_class(base.config_class)
        _MODEL_CLASSES[base] = type(
            f"HfFastattn{base.__name__}",
            (ConvertedModel, base),
            {"config_class": config_class, "__init__": _converted_init, "__module__": __name__},
        )
        globals()[_MODEL_CLASSES[base].__name__] = _MODEL_CLASSES[base]
    return _MODEL_CLASSES[base]


def mark_converted(model: nn.Module) -> None:
    """Turn a converted model (feature maps attached, attention set) into its HfFastattn* class, in place."""
    config = model.config
    model.__class__ = converted_model_class(type(model))
    config.__class__ = converted_config_class(type(config))
    config.fastattn_requires = HINT  # for readers of config.json
    config.architectures = [type(model).__name__]


def register_auto_classes() -> None:
    """Generate the converted classes of every supported family and register them with the Auto classes."""
    for module_name, config_name, models in _FAMILY_CLASSES.values():
        module = importlib.import_module(f"transformers.models.{module_name}")
        config_class = converted_config_class(getattr(module, config_name))
        globals()[config_class.__name__] = config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        # config.json stores the type with the hint for users without hf_fastattn (`saved_model_type`); AutoConfig's
        # own register insists on the class's model_type, the mapping does not
        CONFIG_MAPPING.register(saved_model_type(config_class.model_type), config_class, exist_ok=True)
        for model_name, auto in models:
            auto.register(config_class, converted_model_class(getattr(module, model_name)), exist_ok=True)
    assert set(_FAMILY_CLASSES) == set(FAMILIES)


def is_converted_config(config) -> bool:
    return (
        str(getattr(config, "model_type", "")).startswith(CONVERTED_PREFIX)
        and base_model_type(config) in FAMILIES
    )
