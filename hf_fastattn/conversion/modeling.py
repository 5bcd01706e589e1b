"""Persistence of converted models: distinct `model_type`s registered with the Auto classes.

A converted model has `model_type = "hf_fastattn_<family>"` (e.g. "hf_fastattn_llama"), its architecture class
`HfFastattn<Arch>` (e.g. "HfFastattnLlamaForCausalLM"), the method and options in `config.fastattn_conversion`
and the attention options in `config.fastattn`. For each family converted or read, a config subclass and model
subclasses of the family's classes are generated and registered with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForMaskedLM` (and the sequence / token classification Auto classes): at conversion,
or when `AutoConfig` first meets the type "hf_fastattn_<family>" (`register_auto_classes`, run by
`import hf_fastattn`, makes transformers' config table answer for those types on demand). Their `__init__` sets the
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

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..integration.variants import is_variant
from .families import CONVERTED_PREFIX, base_model_type

HINT = "this checkpoint was converted by hf_fastattn: pip install hf_fastattn and import hf_fastattn"


def saved_model_type(model_type: str) -> str:
    """The model type written to config.json for the converted `model_type`: it carries `HINT`, which transformers
    prints when it does not know the type (hf_fastattn not imported)."""
    return f"{model_type} ({HINT})"


# the Auto classes a converted model class is registered with (those that map the family's config to the class)
AUTO_CLASSES = (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)


class ConvertedModel:
    """Marker mixin of the generated converted-model classes."""


_CONFIG_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[tuple[type, type], type] = {}


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
        _register(base, _CONFIG_CLASSES[base])
    return _CONFIG_CLASSES[base]


def _register(base: type[PretrainedConfig], config_class: type[PretrainedConfig]) -> None:
    """Register a converted config class (plain and hinted model type) and, for each Auto class that maps `base` to
    a model class, the converted subclass of that model class."""
    globals()[config_class.__name__] = config_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    # config.json stores the type with the hint for users without hf_fastattn (`saved_model_type`); AutoConfig's
    # own register insists on the class's model_type, the mapping does not
    CONFIG_MAPPING.register(saved_model_type(config_class.model_type), config_class, exist_ok=True)
    for auto in AUTO_CLASSES:
        try:
            model_class = auto._model_mapping[base]
        except (KeyError, AttributeError):
            continue
        if isinstance(model_class, type):
            auto.register(config_class, converted_model_class(model_class, base), exist_ok=True)


def _converted_init(self, config, *args, **kwargs):
    from .registry import conversion_spec

    spec = conversion_spec(config)
    if not spec:
        raise ValueError(
            f"{type(self).__name__} needs a config with a fastattn_conversion entry (a converted model)"
        )
    cls = _converted_base(type(self))
    cls.__init__(self, config, *args, **kwargs)
    from .registry import attach_from_config

    attach_from_config(self)


def _converted_base(cls: type) -> type:
    base = getattr(cls, "_fastattn_base", None)
    if base is None:
        raise TypeError(f"{cls.__name__} is not a converted-model class")
    return base


def converted_model_class(
    base: type[PreTrainedModel], config_base: type[PretrainedConfig] | None = None
) -> type[PreTrainedModel]:
    """The subclass of a transformers model class used for converted models of that class with configs of
    `config_base` (default: the class's own `config_class`; families that reuse another family's model class, as
    EXAONE reuses Llama's, have their own config class), generated once."""
    config_base = config_base or base.config_class
    key = (base, config_base)
    if key not in _MODEL_CLASSES:
        config_class = converted_config_class(config_base)  # registering it may have generated this class
    if key not in _MODEL_CLASSES:
        name = f"HfFastattn{base.__name__}"
        if config_base is not base.config_class:
            name = f"HfFastattn{config_base.__name__.removesuffix('Config')}{base.__name__}"
        _MODEL_CLASSES[key] = type(
            name,
            (ConvertedModel, base),
            {
                "config_class": config_class,
                "__init__": _converted_init,
                "__module__": __name__,
                "_fastattn_base": base,
            },
        )
        globals()[name] = _MODEL_CLASSES[key]
    return _MODEL_CLASSES[key]


def mark_converted(model: nn.Module) -> None:
    """Turn a converted model (feature maps attached, attention set) into its HfFastattn* class, in place."""
    config = model.config
    model.__class__ = converted_model_class(type(model), type(config))
    config.__class__ = converted_config_class(type(config))
    config.fastattn_requires = HINT  # for readers of config.json
    config.architectures = [type(model).__name__]


class _ConvertedConfigs(dict):
    """`CONFIG_MAPPING`'s table of registered types, answering for converted types on demand: "hf_fastattn_<type>"
    (with or without `HINT`) generates and registers the converted classes of the base type the first time a
    checkpoint of it is read. So every family the conversion supports loads, without generating classes for all
    of transformers' model types at import."""

    def _generate(self, key) -> bool:
        if not isinstance(key, str) or not key.startswith(CONVERTED_PREFIX):
            return False
        model_type = key.removeprefix(CONVERTED_PREFIX).removesuffix(f" ({HINT})")
        if model_type not in CONFIG_MAPPING or model_type.startswith(CONVERTED_PREFIX):
            return False
        converted_config_class(CONFIG_MAPPING[model_type])
        return dict.__contains__(self, key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or self._generate(key)

    def __missing__(self, key):
        if self._generate(key):
            return dict.__getitem__(self, key)
        raise KeyError(key)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel*` resolve converted model types ("hf_fastattn_<type>") of every transformers
    model type: the classes of a type are generated the first time it is converted or read (idempotent)."""
    if not isinstance(CONFIG_MAPPING._extra_content, _ConvertedConfigs):
        CONFIG_MAPPING._extra_content = _ConvertedConfigs(CONFIG_MAPPING._extra_content)


def is_converted_config(config) -> bool:
    return (
        str(getattr(config, "model_type", "")).startswith(CONVERTED_PREFIX)
        and base_model_type(config) in CONFIG_MAPPING
    )
