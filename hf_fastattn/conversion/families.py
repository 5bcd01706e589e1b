"""What conversion needs to know about a model, read from the model itself.

A `Family` says which modules are the attention modules (where learned feature maps are attached), their head
counts, whether they are causal, where the K and V projections are (for K/V pooling) and which modules LoRA targets.
It is derived for every model the compatibility rule (`hf_fastattn.integration.compatibility`) accepts:

- the attention modules are those whose class's code calls transformers' attention interface (the rule's own
  reading of the modeling code, `dispatching_classes`), cross-attention excluded;
- the head counts come from the module (`num_heads`, `head_dim`, `num_key_value_groups`, ...) or the config
  (`num_attention_heads`, `num_key_value_heads`, `n_head`, `multi_query`, ...), per module (layers may differ);
- causal is the modules' `is_causal`;
- the LoRA targets are the Linear / Conv1D projections inside the attention modules (and the BERT kind's output
  projection, which sits beside its self-attention module);
- the K/V projections are separate Linear layers (`k_proj` / `v_proj`, `key` / `value`, `k` / `v`, `Wk` / `Wv`, ...),
  GPT-2's fused Conv1D `c_attn`, or a fused Linear whose row layout is known per attention class (`FUSED_QKV`).
  Other layouts (`POOLING_REFUSED`) get a ValueError from "mqa" / "gqa" naming the reason.

The only per-family knowledge left is what the code does not show: the row layouts of fused projections and the
refusals. `FAMILIES` answers `FAMILIES[model_type]` for a model type's default config (built on the meta device).
The K/V pooling itself (`pool_kv`, `fit_kv`), which rewrites the projections found here, is `kv_pooling.py`.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..integration.compatibility import _source_facts, incompatibility

CONVERTED_PREFIX = "hf_fastattn_"

# names of separate projections, most common first
Q_NAMES = ("q_proj", "query", "q", "Wq", "wq", "q_lin")
K_NAMES = ("k_proj", "key", "k", "Wk", "wk", "k_lin")
V_NAMES = ("v_proj", "value", "v", "Wv", "wv", "v_lin")
O_NAMES = ("o_proj", "out_proj", "dense", "Wo", "wo", "out_lin", "c_proj", "o")
# fused q/k/v projections whose row layout the modeling code fixes, by attention class: "blocks" = rows
# [q (H D) | k (Hkv D) | v (Hkv D)], "per_head" = rows [H, (q, k, v), D] (one q, k, v triple per head)
FUSED_QKV = {
    "GPT2Attention": ("c_attn", "blocks"),  # Conv1D: the columns of its [E, 3E] weight
    "Phi3Attention": ("qkv_proj", "blocks"),
    "ModernBertAttention": ("Wqkv", "blocks"),
    "GPTNeoXAttention": ("query_key_value", "per_head"),
    "PersimmonAttention": ("query_key_value", "per_head"),
    "GPTBigCodeAttention": ("c_attn", None),  # "blocks" with multi_query, else "per_head" (see `_fused_layout`)
}
POOLING_REFUSED = {
    "CodeGenAttention": "its fused qkv_proj interleaves q, k and v in model-parallel blocks (mp_num), not per head",
    "JetMoeAttention": "its queries come from a mixture of attention experts (MoA) and its kv_proj is shared by them",
    "NeoMMEAttention": "its output is projected on the value heads (exclusive self-attention) outside the attention "
    "function, which K/V pooling would change",
}
POOLING_SUPPORTED = (
    "separate K and V Linear projections (k_proj / v_proj, key / value, k / v, Wk / Wv, k_lin / v_lin), GPT-2's "
    "fused Conv1D c_attn, and the fused Linear projections of "
    + ", ".join(sorted(c for c in FUSED_QKV if c != "GPT2Attention"))
)


@dataclass(frozen=True)
class Family:
    """Args:
    name: the base `model_type` ("llama", "gpt2", ...).
    attention_class: class name of the (first) attention module, the one that calls the attention function.
    native_gqa: K/V pooling shrinks the K/V projections and sets `config.num_key_value_heads` (the pooled model is a
        standard checkpoint); False: pooling ties the heads of a group and runs the "mqa" implementation.
    causal: decoder (True) or encoder (False).
    lora_targets: a peft `target_modules` regex for the attention projections.
    attention_classes: every attention-module class name of the model.
    heads: (H, Hkv, D) of the first attention module (layers may differ: see `module_heads`).
    kv_layout: "separate", "blocks" or "per_head" (fused), or None where K/V pooling is refused.
    kv_refusal: why K/V pooling is refused (None where it is supported).
    """

    name: str
    attention_class: str
    native_gqa: bool
    causal: bool
    lora_targets: str
    attention_classes: tuple[str, ...] = ()
    heads: tuple[int, int, int] = (0, 0, 0)
    kv_layout: str | None = None
    kv_refusal: str | None = None


def base_model_type(config) -> str:
    return str(getattr(config, "model_type", "")).removeprefix(CONVERTED_PREFIX)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _forward_owner(cls: type) -> type:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    return cls


@functools.lru_cache(maxsize=1024)
def calls_attention_function(cls: type) -> bool:
    """Whether modules of `cls` call the registered attention function: the class that defines its `forward` is one
    whose code the compatibility rule found dispatching through transformers' attention interface."""
    owner = _forward_owner(cls)
    module = getattr(owner, "__module__", "") or ""
    if not module.startswith("transformers.models.") or module not in sys.modules:
        return False
    return owner.__name__ in _source_facts(module).get("dispatching_classes", ())


def _find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if calls_attention_function(type(m)) and not getattr(m, "is_cross_attention", False)
    ]


def attention_modules(model: nn.Module, family: Family | None = None) -> list[nn.Module]:
    """The self-attention modules, in layer order (cross attention excluded). `family` is accepted for the callers
    that pass it; the modules are found from the model's code either way."""
    found = [m for _, m in _find_attention_modules(model)]
    if not found:
        raise ValueError(
            f"hf_fastattn.convert: no attention modules found in {type(model).__name__} (no module class calls "
            "transformers' attention interface)"
        )
    return found


def _int_attr(obj, names) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def module_heads(module: nn.Module, config) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head dim D) of one attention module: its own attributes first (layers may
    differ: Gemma 4's global layers), then the config's."""
    text = _text_config(config)
    h = _int_attr(module, ("num_heads", "num_attention_heads", "n_heads", "n_head")) or _int_attr(
        text, ("num_attention_heads", "n_head", "n_heads")
    )
    if h is None:
        raise ValueError(f"hf_fastattn: cannot read the number of heads of {type(module).__name__}")
    d = _int_attr(module, ("head_dim", "attention_head_size", "head_size")) or _int_attr(text, ("head_dim",))
    if d is None:
        d = _int_attr(text, ("hidden_size", "n_embd", "d_model")) // h
    hkv = _int_attr(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    if hkv is None:
        groups = _int_attr(module, ("num_key_value_groups",))
        if groups is not None:
            hkv = h // groups
        elif getattr(text, "multi_query", False):
            hkv = 1
        else:
            hkv = _int_attr(text, ("num_key_value_heads",)) or h
    return h, hkv, d


def head_counts(config, family: Family | None = None) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head dim D) from a config (the first attention layer's for a model whose
    layers differ: `module_heads` reads one module)."""
    text = _text_config(config)
    h = _int_attr(text, ("num_attention_heads", "n_head", "n_heads"))
    if h is None:
        if family is not None and family.heads[0]:
            return family.heads
        raise ValueError(f"hf_fastattn: cannot read the number of heads from {type(config).__name__}")
    d = _int_attr(text, ("head_dim",)) or _int_attr(text, ("hidden_size", "n_embd", "d_model")) // h
    hkv = 1 if getattr(text, "multi_query", False) else (_int_attr(text, ("num_key_value_heads",)) or h)
    return h, hkv, d


def _child(module: nn.Module, names, kinds=(nn.Linear, Conv1D)) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, kinds):
            return name, child
    return None


def _fused_layout(module: nn.Module) -> tuple[str, str] | None:
    cls = _forward_owner(type(module)).__name__
    if cls not in FUSED_QKV:
        return None
    name, layout = FUSED_QKV[cls]
    if layout is None:  # GPTBigCode
        layout = "blocks" if getattr(module, "multi_query", module.config.multi_query) else "per_head"
    return name, layout


def kv_layout(module: nn.Module) -> tuple[str | None, str | None]:
    """(layout, refusal) of the K/V projections of one attention module: "separate", "blocks" or "per_head", or
    (None, why not)."""
    cls = _forward_owner(type(module)).__name__
    if cls in POOLING_REFUSED:
        return None, POOLING_REFUSED[cls]
    fused = _fused_layout(module)
    if fused is not None:
        return fused[1], None
    if _child(module, K_NAMES) and _child(module, V_NAMES):
        joint = _joint_key_norm(module)
        if joint is not None:
            return None, (
                f"{cls} normalizes the keys of all heads together ({joint} over Hkv * D features), so pooled K "
                "projections are not pooled keys"
            )
        return "separate", None
    projections = [n for n, c in module.named_children() if isinstance(c, (nn.Linear, Conv1D))]
    return None, (
        f"{cls} has the projections {projections}, none of which is a known separate K/V pair or a fused q/k/v "
        "projection of known layout"
    )


def _joint_key_norm(module: nn.Module) -> str | None:
    """The name of a key norm whose weight spans every K/V head at once (OLMo 2's k_norm over Hkv * D), or None."""
    k = _child(module, K_NAMES)[1]
    width = k.weight.shape[0] if isinstance(k, nn.Linear) else k.weight.shape[1]
    d = _int_attr(module, ("head_dim", "attention_head_size", "head_size"))
    for name, child in module.named_children():
        weight = getattr(child, "weight", None)
        if name.lower().startswith("k") and "norm" in name.lower() and isinstance(weight, torch.Tensor):
            if weight.dim() == 1 and weight.numel() == width and width != d:
                return name
    return None


def _output_projection(model: nn.Module, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The output projection of an attention module: a child named like one, or (the BERT kind) the `output.dense`
    of the parent that holds the self-attention module as `self`."""
    found = _child(module, O_NAMES)
    if found is not None:
        return found
    for parent in model.modules():
        if getattr(parent, "self", None) is module and isinstance(
            getattr(getattr(parent, "output", None), "dense", None), nn.Linear
        ):
            return "output.dense", parent.output.dense
    return None


def _lora_targets(model: nn.Module, named: list[tuple[str, nn.Module]]) -> str:
    """A peft `target_modules` regex matching the Linear / Conv1D projections inside the attention modules (gates and
    routers aside) and the BERT kind's `output.dense`, with layer indices generalized to `\\d+`."""
    paths = set()
    for name, module in named:
        for child_name, child in module.named_modules():
            # output gates and MoA routers are not projections of q, k, v or o (and peft refuses a "gate_proj"
            # target in models whose MLP fuses gate_proj with up_proj)
            if child_name and isinstance(child, (nn.Linear, Conv1D)) and not re.search("gate|router", child_name):
                paths.add(f"{name}.{child_name}")
        if _child(module, O_NAMES) is None and name.endswith(".self"):
            out = _output_projection(model, module)
            if out is not None:
                paths.add(f"{name.removesuffix('.self')}.{out[0]}")
    patterns = sorted({_path_pattern(p) for p in paths})
    return r"(.*\.)?(" + "|".join(patterns) + ")"


def _path_pattern(path: str) -> str:
    r"""`model.layers.0.self_attn.q_proj` -> `layers\.\d+\.self_attn\.q_proj`: from the container of the first layer
    index on (so that the pattern matches the base model and the model with a head alike), indices as `\d+`."""
    parts = path.split(".")
    first = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if first is not None and first > 0:
        parts = parts[first - 1 :]
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parts)


def _native_gqa(config, modules: list[nn.Module], layout: str | None) -> bool:
    """Pooling can shrink the K/V projections: the config has `num_key_value_heads`, every module has that many,
    and the projections are separate or fused in blocks (so that fewer K/V rows keep the layout)."""
    text = _text_config(config)
    hkv = getattr(text, "num_key_value_heads", None)
    if layout not in ("separate", "blocks") or not isinstance(hkv, int):
        return False
    return all(module_heads(m, config)[1] == hkv for m in modules) and all(
        not isinstance(_fused_projection(m)[1], Conv1D) for m in modules if layout == "blocks"
    )


def _fused_projection(module: nn.Module) -> tuple[str, nn.Module]:
    name = _fused_layout(module)[0]
    return name, getattr(module, name)


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model (or of a config: a model is built from it on the meta device), or a
    ValueError saying why it cannot be converted."""
    if not isinstance(model, nn.Module) and hasattr(model, "model_type"):
        return _family_of_config(model)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"hf_fastattn.convert: {type(model).__name__} is not a transformers model (no config)")
    reason = incompatibility(type(model), config, "linear")
    if reason is not None:
        raise ValueError(
            f"hf_fastattn.convert: {type(model).__name__} (model_type {base_model_type(config)!r}) cannot be "
            f"converted: {reason}. See the README section 'Supported model families'."
        )
    named = _find_attention_modules(model)
    if not named:
        raise ValueError(
            f"hf_fastattn.convert: no attention modules found in {type(model).__name__} (model_type "
            f"{base_model_type(config)!r}): no module class calls transformers' attention interface"
        )
    modules = [m for _, m in named]
    layouts = {kv_layout(m) for m in modules}
    layout, refusal = layouts.pop() if len(layouts) == 1 else (None, f"its layers have different K/V layouts {layouts}")
    first = modules[0]
    return Family(
        name=base_model_type(config),
        attention_class=type(first).__name__,
        native_gqa=_native_gqa(config, modules, layout),
        causal=bool(getattr(first, "is_causal", getattr(_text_config(config), "is_decoder", True))),
        lora_targets=_lora_targets(model, named),
        attention_classes=tuple(dict.fromkeys(type(m).__name__ for m in modules)),
        heads=module_heads(first, config),
        kv_layout=layout,
        kv_refusal=refusal,
    )


def _meta_model(config) -> nn.Module:
    """The transformers model of `config` (AutoModel, else AutoModelForCausalLM), built on the meta device."""
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModel, AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            cls = auto._model_mapping[type(config)]
            break
    else:
        raise ValueError(f"hf_fastattn.convert: model_type {base_model_type(config)!r} has no transformers model class")
    with torch.device("meta"):
        return cls._from_config(config)


def _family_of_config(config) -> Family:
    return family_of(_meta_model(config))


# the names transformers gives a learned absolute position table: GPT-2's `wpe`, OPT's / BioGPT's `embed_positions`,
# the BERT kind's `position_embeddings`, ...
_POSITION_TABLE = re.compile(r"(^|_)(wpe|pos|position|positions)(_|$)")


def learned_position_limit(model) -> int | None:
    """How many positions a model's learned absolute position table covers (a model, or a config: the model is built
    on the meta device), or None when its positions are not such a table (RoPE, sinusoidal, none): no sequence may be
    longer, where RoPE models merely extrapolate.

    Read from the model, not from a list of families: an `nn.Embedding` named as transformers names position tables
    (`wpe`, `embed_positions`, `position_embeddings`, ...) outside the attention modules. Its rows, less OPT's and
    BioGPT's `offset` (2), and less the rows up to `padding_idx` that RoBERTa-style position ids skip (they start at
    `padding_idx + 1`): GPT-2 `n_positions`, OPT and BERT `max_position_embeddings`, RoBERTa 514 - 2 = 512.
    """
    if not isinstance(model, nn.Module) and hasattr(model, "model_type"):
        model = _meta_model(model)
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and _POSITION_TABLE.search(name.rpartition(".")[2]):
            rows = module.num_embeddings - int(getattr(module, "offset", 0) or 0)
            if module.padding_idx is not None:
                rows -= module.padding_idx + 1
            limits.append(rows)
    return min(limits) if limits else None


class _Families(Mapping):
    """`FAMILIES[model_type]`: the `Family` of a model type's default config (derived once, on the meta device);
    a KeyError saying why for a model type that cannot be converted. Iteration lists the families derived so far
    (the supported set is every family the compatibility rule accepts: see the README's families table)."""

    def __init__(self):
        self._known: dict[str, Family] = {}

    def __getitem__(self, model_type: str) -> Family:
        if model_type not in self._known:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                raise KeyError(f"{model_type!r} is not a transformers model type")
            try:
                self._known[model_type] = _family_of_config(CONFIG_MAPPING[model_type]())
            except ValueError as err:
                raise KeyError(str(err)) from err
        return self._known[model_type]

    def __iter__(self):
        return iter(list(self._known))

    def __len__(self) -> int:
        return len(self._known)


FAMILIES: Mapping[str, Family] = _Families()
