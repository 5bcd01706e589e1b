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
"""

from __future__ import annotations

import functools
import inspect
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


# ---------------------------------------------------------------------------------------------------------------
# the K/V projections of one attention module, as rows [out, in + 1] (the bias, zeros if none, as a last column)


def _rows(proj: nn.Module) -> torch.Tensor:
    w = proj.weight.t() if isinstance(proj, Conv1D) else proj.weight  # Conv1D: [in, out]
    bias = proj.bias if proj.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, bias[:, None]], 1)


def _set_rows(proj: nn.Module, rows: torch.Tensor) -> None:
    w = rows[:, :-1].to(proj.weight.dtype)
    proj.weight.copy_(w.t() if isinstance(proj, Conv1D) else w)
    if proj.bias is not None:
        proj.bias.copy_(rows[:, -1].to(proj.bias.dtype))


def _new_linear(old: nn.Module, rows: torch.Tensor) -> nn.Linear:
    """A Linear with `rows` (fewer outputs than `old`), on `old`'s device and dtype."""
    new = nn.Linear(rows.shape[1] - 1, rows.shape[0], bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    _set_rows(new, rows)
    return new


def _fused_index(layout: str, h: int, hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of q, k and v in a fused projection."""
    if layout == "blocks":
        q = torch.arange(h * d)
        k = h * d + torch.arange(hkv * d)
        return q, k, h * d + hkv * d + torch.arange(hkv * d)
    if h != hkv:
        raise ValueError(
            f"hf_fastattn: a per-head fused q/k/v projection needs as many K/V heads as heads ({hkv} != {h})"
        )
    per = torch.arange(h)[:, None] * 3 * d + torch.arange(d)  # [H, D]
    return per.flatten(), (per + d).flatten(), (per + 2 * d).flatten()


def _kv_check(model: nn.Module, family: Family) -> None:
    if family.kv_layout is None:
        raise ValueError(
            f'hf_fastattn: K/V pooling ("mqa" / "gqa") does not support {family.name!r}: {family.kv_refusal}. '
            f"Supported: {POOLING_SUPPORTED}"
        )


def _read_qkv(module: nn.Module, family: Family, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [H D, E+1], k [Hkv D, E+1], v [Hkv Dv, E+1]) rows of one attention module."""
    h, hkv, d = heads
    if family.kv_layout == "separate":
        q = _child(module, Q_NAMES)
        k, v = _child(module, K_NAMES)[1], _child(module, V_NAMES)[1]
        return (_rows(q[1]) if q else None), _rows(k), _rows(v)
    rows = _rows(_fused_projection(module)[1])
    qi, ki, vi = _fused_index(family.kv_layout, h, hkv, d)
    return rows[qi], rows[ki], rows[vi]


def _write_qkv(module: nn.Module, family: Family, heads, q, k, v) -> None:
    """Write q, k, v rows back; k and v with fewer heads than the module has (native GQA) replace the projections
    by smaller ones and update the module's head attributes."""
    h, hkv, d = heads
    groups = k.shape[0] // d
    if family.kv_layout == "separate":
        found = _child(module, Q_NAMES)
        if q is not None and found is not None:
            _set_rows(found[1], q)
        for names, rows in ((K_NAMES, k), (V_NAMES, v)):
            name, proj = _child(module, names)
            if rows.shape[0] == proj.weight.shape[0 if isinstance(proj, nn.Linear) else 1]:
                _set_rows(proj, rows)
            else:
                setattr(module, name, _new_linear(proj, rows))
    else:
        name, proj = _fused_projection(module)
        if groups == hkv:
            full = _rows(proj).clone()
            qi, ki, vi = _fused_index(family.kv_layout, h, hkv, d)
            full[qi], full[ki], full[vi] = q.to(full.dtype), k.to(full.dtype), v.to(full.dtype)
            _set_rows(proj, full)
        else:  # blocks, fewer K/V heads
            setattr(module, name, _new_linear(proj, torch.cat([q, k, v]).to(proj.weight.dtype)))
    if groups != hkv:
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, groups)
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = h // groups


def _check_groups(model: nn.Module, groups: int) -> list[tuple[nn.Module, tuple[int, int, int]]]:
    modules = [(m, module_heads(m, model.config)) for m in attention_modules(model)]
    for _, (_, hkv, _) in modules:
        if not isinstance(groups, int) or groups < 1 or hkv % groups != 0:
            raise ValueError(
                f"num_key_value_heads={groups} must divide the model's {hkv} key/value heads "
                f"(valid: {[g for g in range(1, hkv + 1) if hkv % g == 0]})"
            )
    return modules


def _pool_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Rows `[heads * D, ...]` -> `[groups * D, ...]`: the mean over each run of heads / groups consecutive heads."""
    rest = w.shape[1:]
    return w.reshape(groups, heads // groups, head_dim, *rest).mean(1).reshape(groups * head_dim, *rest)


def _tie_rows(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Like `_pool_rows` but each group's mean is written back to all its heads (same shape as `w`)."""
    rest = w.shape[1:]
    pooled = w.reshape(groups, heads // groups, head_dim, *rest).mean(1, keepdim=True)
    return pooled.expand(groups, heads // groups, head_dim, *rest).reshape(w.shape)


def _set_config_kv_heads(model: nn.Module, groups: int) -> None:
    _text_config(model.config).num_key_value_heads = groups
    if model.config is not _text_config(model.config) and hasattr(model.config, "num_key_value_heads"):
        model.config.num_key_value_heads = groups


@torch.no_grad()
def pool_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Mean-pool the K and V projections (weights and biases) into `groups` heads, in place.

    Native-GQA families get smaller K/V projections and `config.num_key_value_heads = groups` (a standard model).
    The others keep their shapes: every head of a group gets the group's mean, so the model equals the pooled one
    and the "mqa" attention function (kv_groups = groups) computes it with `groups` K/V heads.
    """
    _kv_check(model, family)
    for module, heads in _check_groups(model, groups):
        _, hkv, _ = heads
        q, k, v = _read_qkv(module, family, heads)
        dk, dv = k.shape[0] // hkv, v.shape[0] // hkv
        pool = _pool_rows if family.native_gqa else _tie_rows
        _write_qkv(module, family, heads, q, pool(k, hkv, groups, dk), pool(v, hkv, groups, dv))
    if family.native_gqa:
        _set_config_kv_heads(model, groups)


# ---------------------------------------------------------------------------------------------------------------
# circuit-preserving K/V pooling (init="svd" of "mqa" / "gqa")


def _rope_pairs(model: nn.Module, d: int) -> tuple[list[tuple[int, int]], list[int]] | None:
    """None without a rotary embedding in q and k; else (the pairs of head dims RoPE rotates together, the dims it
    leaves alone). Read from the config (partial rotary: `partial_rotary_factor`, `rotary_dim`, `rotary_pct`) and from
    the modeling code's rotation: Llama's `rotate_half` pairs (j, j + R/2), the interleaved forms (`x[..., ::2]` or
    `x[..., 0::2]`: Cohere, GLM, GPT-J's `rotate_every_two`) pair (2j, 2j + 1); the first R dims of each head are rotated. A ValueError otherwise."""
    text = _text_config(model.config)
    rope = getattr(text, "rope_parameters", None)
    rotary_dim = getattr(text, "rotary_dim", None)
    if rope is None and rotary_dim is None and getattr(text, "position_embedding_type", None) != "rotary":
        return None
    factors = [getattr(text, "partial_rotary_factor", None), getattr(text, "rotary_pct", None)]
    if isinstance(rope, dict):
        nested = [p for p in rope.values() if isinstance(p, dict)] or [rope]
        factors += [p.get("partial_rotary_factor") for p in nested]
    factors = {f for f in factors if f is not None}
    if len(factors) > 1:
        raise ValueError(
            f"its rotary embedding covers different fractions of the head per layer type {sorted(factors)}"
        )
    r = rotary_dim if rotary_dim is not None else int(d * factors.pop()) if factors else d
    if r % 2 or not 0 < r <= d:
        raise ValueError(f"its rotary embedding covers {r} of the {d} head dims, not an even number of them")
    module = sys.modules.get(_forward_owner(type(attention_modules(model)[0])).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    source = inspect.getsource(apply) if apply is not None else ""
    rotate = next((getattr(module, n) for n in ("rotate_half", "rotate_every_two") if f"{n}(" in source), None)
    rotate_source = inspect.getsource(rotate) if rotate is not None else ""
    if any(f"x[{lead}{start}::2]" in rotate_source for lead in ("..., ", ":, :, :, ") for start in ("", "0")):
        return [(2 * j, 2 * j + 1) for j in range(r // 2)], list(range(r, d))
    if "x[..., : x.shape[-1] // 2]" in rotate_source:
        return [(j, j + r // 2) for j in range(r // 2)], list(range(r, d))
    raise ValueError("its rotary embedding's rotation is not one the per-pair fit knows (rotate_half, interleaved)")


def _split_svd(stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [M, r], right [r, N]) with left @ right the best rank-r approximation of `stack`, the singular values
    split evenly (sqrt each side) so that both factors keep the scale of the weights they replace."""
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def _fit_group(q, k, v, o, heads: list[int], kv_of: list[int], d: int, rope):
    """Shared K and V rows `[D, E+1]` of one group of query heads, with the group's new Q rows and O columns.
    `rope`: None, or (pairs of dims rotated together, dims not rotated) from `_rope_pairs`."""
    n, e = q.shape[-1], o.shape[0]
    # values: the output-value circuits O_h V_h of the group's heads, stacked, at rank D: V' shared, O_h' per head
    left, v_new = _split_svd(torch.cat([o[:, h] @ v[kv_of[h]] for h in heads]), d)
    o_new = {h: left[i * e : (i + 1) * e] for i, h in enumerate(heads)}
    q_new = {h: q[h].clone() for h in heads}
    k_new = torch.empty(d, n, dtype=q.dtype)
    pairs, plain = rope if rope is not None else ([], list(range(d)))
    if plain:
        # scores x_q^T Q_h^T K_h x_k over the dims RoPE leaves alone: the circuits Q_h^T K_h stacked, at their rank
        left, k_new[plain] = _split_svd(torch.cat([q[h, plain].t() @ k[kv_of[h], plain] for h in heads]), len(plain))
        for i, h in enumerate(heads):
            q_new[h][plain] = left[i * n : (i + 1) * n].t()
    # RoPE rotates each pair of dims (a, b) as one complex number z = x_a + i x_b; a complex factor per head and pair
    # commutes with it, so each pair gets a shared key row and per-head query rows from a complex rank-1 fit of the
    # circuits conj(q_h) k_h^T (score = Re(conj(z_q) z_k e^{i(theta_k - theta_q)})).
    for a, b in pairs:
        qz = {h: torch.complex(q[h, a], q[h, b]) for h in heads}
        kz = {h: torch.complex(k[kv_of[h], a], k[kv_of[h], b]) for h in heads}
        left, right = _split_svd(torch.cat([torch.outer(qz[h].conj(), kz[h]) for h in heads]), 1)
        k_new[a], k_new[b] = right[0].real, right[0].imag
        for i, h in enumerate(heads):
            qh = left[i * n : (i + 1) * n, 0].conj()
            q_new[h][a], q_new[h][b] = qh.real, qh.imag
    return q_new, k_new, v_new, o_new


def _svd_refusal(model: nn.Module, family: Family, module: nn.Module, heads) -> str | None:
    """Why the circuit fit cannot refit this module, or None."""
    h, hkv, d = heads
    if family.kv_layout == "separate" and _child(module, Q_NAMES) is None:
        return "no separate query projection was found"
    out = _output_projection(model, module)
    if out is None:
        return "no output projection was found"
    q, k, v = _read_qkv(module, family, heads)
    if v.shape[0] != hkv * d or q.shape[0] != h * d:
        return "its value (or query) heads are not of the key head size"
    if (out[1].weight.shape[1] if isinstance(out[1], nn.Linear) else out[1].weight.shape[0]) != h * d:
        return "its output projection does not take the H * D attention outputs"
    projections = {id(p) for m in (*_projection_modules(module, family), out[1]) for p in m.parameters()}
    other = [n for n, p in module.named_parameters() if id(p) not in projections]
    other += [n for n, _ in module.named_children() if "norm" in n.lower() and n not in other]  # parameter-free norms
    if other:
        return (
            f"its attention has parameters or norms beside the q/k/v/o projections ({', '.join(other[:4])}: norms, "
            "gates or sinks), which do not commute with the refit of the query and output rows"
        )
    return None


def _projection_modules(module: nn.Module, family: Family) -> list[nn.Module]:
    if family.kv_layout == "separate":
        found = [_child(module, names) for names in (Q_NAMES, K_NAMES, V_NAMES)]
        return [child for _, child in filter(None, found)]
    return [_fused_projection(module)[1]]


@torch.no_grad()
def fit_kv(model: nn.Module, family: Family, groups: int) -> None:
    """Pool K/V into `groups` heads keeping the attention circuits, in place (the "svd" init of mqa / gqa).

    Mean pooling (`pool_kv`) averages the K and V projections of a group's heads. This fit instead keeps what the
    heads compute as closely as a shared K/V head allows, from the weights alone: per group, the value-output
    circuits `O_h V_h` of its heads are stacked and factored at rank D (truncated SVD), giving the shared V
    projection and new per-head output columns; the query-key circuits `Q_h^T K_h` likewise give the shared K
    projection and new per-head query rows. With rotary embeddings the fit is per rotary pair, a complex rank-1
    factorization (a complex factor commutes with the rotation); half-split, interleaved and partial RoPE. Exact when nothing is pooled (groups = K/V heads);
    Q, K, V and O change (biases included), the shapes are those of `pool_kv`. Not for attention with other
    parameters between the projections (Qwen3's q_norm / k_norm, output gates, sinks), rotations it does not
    recognize, or value heads of another size: a ValueError says which.
    """
    _kv_check(model, family)
    modules = _check_groups(model, groups)
    for module, heads in modules:
        reason = _svd_refusal(model, family, module, heads)
        if reason is None:
            try:
                _rope_pairs(model, heads[2])
            except ValueError as err:
                reason = str(err)
        if reason is not None:
            raise ValueError(f"init='svd' does not apply to {family.name!r}: {reason}; use init='mean'")
    for module, (h, hkv, d) in modules:
        q, k, v = (x.double() for x in _read_qkv(module, family, (h, hkv, d)))
        out = _output_projection(model, module)[1]
        o = (out.weight.t() if isinstance(out, Conv1D) else out.weight).double()  # [E, H D]
        n = q.shape[-1]
        q, k, v, o = q.view(h, d, n), k.view(hkv, d, n), v.view(hkv, d, n), o.view(o.shape[0], h, d)
        per = h // groups
        kv_of = [i // (h // hkv) for i in range(h)]
        rope = _rope_pairs(model, d)
        new_q, new_o = q.clone(), o.clone()
        new_k = torch.empty(groups, d, n, dtype=q.dtype)
        new_v = torch.empty(groups, d, n, dtype=q.dtype)
        for g in range(groups):
            members = list(range(g * per, (g + 1) * per))
            qg, new_k[g], new_v[g], og = _fit_group(q, k, v, o, members, kv_of, d, rope)
            for i in members:
                new_q[i], new_o[:, i] = qg[i], og[i]
        if not family.native_gqa:  # one K/V row block per head: every head of a group gets the group's shared rows
            new_k, new_v = new_k.repeat_interleave(hkv // groups, 0), new_v.repeat_interleave(hkv // groups, 0)
        _write_qkv(module, family, (h, hkv, d), new_q.reshape(h * d, n), new_k.reshape(-1, n), new_v.reshape(-1, n))
        o2 = new_o.reshape(o.shape[0], h * d)
        out.weight.copy_((o2.t() if isinstance(out, Conv1D) else o2).to(out.weight.dtype))
    if family.native_gqa:
        _set_config_kv_heads(model, groups)
