"""Every causal-LM and masked-LM family of the installed transformers, as tiny configs, judged by hf_fastattn's
compatibility rule: the single source of the family tests' parametrization and of the README table.

A tiny config is the family's config class with small values for the fields it has (2 layers, hidden 64, 4 heads,
2 K/V heads, head_dim 16, vocabulary 128, 4 experts of which 2 active), as transformers' own model tests build
them, plus `OVERRIDES` where a family needs more. Families whose tiny model cannot be built here are listed in
`NOT_BUILT` with the reason; they are judged by the rule like any other but not tested.

Run `python tests/test_families/families.py` to print the README table.
"""

from __future__ import annotations

import dataclasses
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

import hf_fastattn  # noqa: E402,F401  (registers the implementations and the checks)
from hf_fastattn.integration.compatibility import incompatibility  # noqa: E402

VOCAB = 128
# set on every config class that has the field (names as the config classes spell them)
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # MoE: few small experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=1,
    # dropout off, so that train/eval do not matter
    attention_dropout=0.0, hidden_dropout=0.0,
)
# per family, on top of COMMON (and used when COMMON's value does not fit the family)
OVERRIDES: dict[str, dict] = {
    # the BERT kind as causal LMs are decoders only with is_decoder (BertForCausalLM warns otherwise)
    **{f: {"is_decoder": True} for f in (
        "bert", "bert-generation", "camembert", "data2vec-text", "electra", "ernie", "roberta",
        "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
    )},
    # sliding-window families: a window shorter than the test sequences, so that the window matters
    "mistral": {"sliding_window": 8},
    "mixtral": {"sliding_window": 8},
    "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "starcoder2": {"sliding_window": 8},
    "gemma2": {"sliding_window": 8},
    "gemma3_text": {"sliding_window": 8},
    "cohere2": {"sliding_window": 8},
    "gpt_oss": {"sliding_window": 8, "intermediate_size": 64},
    "ministral": {"sliding_window": 8},
    "gemma4_unified_text": {"global_head_dim": 32},  # 512 by default: FAST order 2 would hold 512^2 features
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
}
# families whose tiny model is not built here, with the reason (judged by the rule, not tested)
NOT_BUILT: dict[str, str] = {}

CAUSAL_FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
MASKED_FAMILIES = sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
MAX_PARAMETERS = 3_000_000


def tiny_config(family: str, masked: bool = False):
    """The tiny config of `family` (a model_type): COMMON's fields the class has, then OVERRIDES[family] (for the
    causal LM; the masked LM of the same family is an encoder)."""
    cls = CONFIG_MAPPING[family]
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    aliases = getattr(cls, "attribute_map", {}) or {}  # hidden_size -> n_embd, num_hidden_layers -> n_layer ...
    kwargs = {aliases.get(k, k): v for k, v in COMMON.items() if aliases.get(k, k) in names}
    if not masked:
        kwargs.update(OVERRIDES.get(family, {}))
    return cls(**kwargs)


def model_class(family: str, masked: bool = False) -> type:
    mapping = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    return mapping._model_mapping[CONFIG_MAPPING[family]]


def tiny_model(family: str, attn_implementation: str | None = None, masked: bool = False, dtype=torch.float64):
    """A seeded tiny model of `family` in eval mode (float64: see the tests' tolerances). The default attention is
    sdpa, or eager for families transformers' sdpa does not serve (soft-capping, sinks); MoE experts run the eager
    loop (torch's grouped matmul has no float64)."""
    torch.manual_seed(0)
    config = tiny_config(family, masked)
    cls = model_class(family, masked)
    if attn_implementation is None:
        attn_implementation = "sdpa" if cls._supports_sdpa else "eager"
    config._experts_implementation = "eager"
    model = cls._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():  # zero-initialized projections (NeoMME) would hide the attention
                p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


@functools.cache
def verdict(family: str, implementation: str = "linear", masked: bool = False) -> str | None:
    """None if the rule accepts `family` for `implementation`, else its reason; "not built: ..." if no tiny config."""
    if family in NOT_BUILT:
        return f"not built: {NOT_BUILT[family]}"
    try:
        config = tiny_config(family, masked)
        cls = model_class(family, masked)
    except Exception as err:  # noqa: BLE001  (a family whose tiny config transformers refuses)
        return f"not built: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    reason = incompatibility(cls, config, implementation)
    if reason is not None:
        return reason
    with torch.device("meta"):
        try:
            n = sum(p.numel() for p in cls._from_config(config).parameters())
        except Exception as err:  # noqa: BLE001
            return f"not built: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    if n > MAX_PARAMETERS:
        return f"not built: the tiny config still has {n} parameters"
    return None


def accepted(implementation: str = "linear", masked: bool = False) -> list[str]:
    families = MASKED_FAMILIES if masked else CAUSAL_FAMILIES
    return [f for f in families if verdict(f, implementation, masked) is None]


def refused(implementation: str = "linear", masked: bool = False) -> dict[str, str]:
    families = MASKED_FAMILIES if masked else CAUSAL_FAMILIES
    out = {f: verdict(f, implementation, masked) for f in families}
    return {f: r for f, r in out.items() if r is not None}


def markdown_table() -> str:
    """The README's table of families: accepted (tested here) and refused, grouped by reason."""
    rows = ["| families | hf_fastattn |", "|---|---|"]
    for masked, kind in ((False, "causal LM"), (True, "masked LM (encoder)")):
        ok = accepted("linear", masked)
        softmax_refused = sorted(set(ok) - set(accepted("sparse", masked)))
        note = f"; not \"sparse\" / \"mqa\": {', '.join(softmax_refused)} (soft-capping or sinks)" if softmax_refused else ""
        rows.append(f"| {', '.join(ok)} | {kind}: accepted and tested ({len(ok)}){note} |")
    grouped: dict[str, list[str]] = {}
    for masked in (False, True):
        for family, reason in refused("linear", masked).items():
            key = "not tested (no tiny model here): " + reason.split(": ", 1)[1].split(":")[0] if reason.startswith(
                "not built") else "refused: " + reason
            if family not in grouped.get(key, []):
                grouped.setdefault(key, []).append(family)
    for reason, families in sorted(grouped.items(), key=lambda kv: (kv[0].startswith("not tested"), kv[0])):
        rows.append(f"| {', '.join(families)} | {reason} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    print(markdown_table())
