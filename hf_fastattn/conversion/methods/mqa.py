""" "mqa" and "gqa" (Ainslie et al. 2023): pool the K and V projections within each group of heads.

Families with native GQA (`config.num_key_value_heads` and separate or block-fused K/V projections: Llama, Mistral,
Qwen2/3, Phi-3, ...) become standard checkpoints with `config.num_key_value_heads = G` (they load without
hf_fastattn). The others (GPT-2, the BERT kind, OPT, GPT-NeoX, ...) keep their shapes: every head of a group gets its
group's mean K/V weights and the "mqa" attention function (`kv_groups = G`) runs them with G K/V heads; the heads stay
tied during fine-tuning because the function pools them (identical gradients). Where the K/V projections are is read
from the model (`families.kv_layout`); layouts it cannot read (CodeGen's model-parallel qkv_proj, JetMoe's mixture
of attention heads) raise a ValueError listing the supported ones.

Three initializations (option `init`): "mean" (Ainslie et al.: each group's K and V projections averaged; Q and O
untouched), "svd" (`kv_pooling.fit_kv`: the shared K and V heads are fit to the query-key and value-output circuits
of the group's heads by truncated SVD, and Q and O are refit to them; exact when nothing is pooled) and "calibrated"
(the same fit in the norm the inputs induce, ||(C - C') S|| with S^2 the second moment of what enters each attention
module, measured by `kv_pooling.input_second_moments` on `convert(..., calibration_data=...)`; the recipes' default,
the runner passing the first 16K training tokens, `runner.calibration_blocks`). On the tiny Llama of `hf-fastattn bench conversion` (4 heads to 1) "svd" starts at 1.4x the
teacher's perplexity where "mean" starts at 2.7x; uptrained by the recipe, "svd" 1.0112x and "calibrated" 1.0110x.
On SmolLM2-135M (3 K/V heads to 1), whose inputs are far from isotropic, untrained held-out perplexity at 512
tokens: mean 14,892, "svd" 217,771, "calibrated" 120 (the original: 35.6). Since stop 43 "calibrated" also fits the
rotary pairs that turn less than half a radian over the calibration blocks (SmolLM2 at 2048 tokens: the 8 slowest of
32) as unrotated dims, one shared real subspace with a full per-head query map instead of a complex factor per head
and pair: untrained, on the first 8,192 held-out tokens, 126.7 -> 85.4 at 512 and 106.0 -> 74.2 at 2048 (turn
limits of 0.1, 1, 2 and 5 radians: 102.5 / 83.3, 75.4 / 79.5, 74.2 / 114.6, 93.2 / 359.4).

The run-time "mqa" implementation (`configure(model, kv_groups=G)`, `set_attn_implementation("mqa")`) on the
original model computes the same model as mean pooling here: where the keys reach the attention function without a
norm in between, and where the attention normalizes each key (or value) head (Qwen3's `k_norm`, HunYuan's
`key_layernorm`, LFM2's and Persimmon's `k_layernorm`, Llama 4's shared `qk_norm`, Gemma 4's `v_norm` ...), because
it pools the projected keys before those norms, as the pooled checkpoint does (see
`integration.mqa_attention.mqa_attention_forward`; checked on every family pooled in
`tests/test_families/test_conversion_families.py`, whose `MQA_DIFFERS` is now empty).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...integration.compatibility import check_compatible
from ...integration.mqa_attention import enable_mqa_key_pooling
from ...integration.registry import configure
from ..families import Family
from ..kv_pooling import calibration_length, fit_kv, input_second_moments, pool_kv
from ..registry import MethodConfig, register_conversion_method

INITS = ("mean", "svd", "calibrated")


def _check_init(method: str, init) -> None:
    if init not in INITS:
        raise ValueError(f"{method} option init must be one of {list(INITS)}, got {init!r}")


class _PoolingConfig(MethodConfig):
    """What "mqa" and "gqa" share: the `init` option, "calibrated" reading calibration data."""

    init: str

    def needs_calibration(self) -> bool:
        return self.init == "calibrated"


@dataclass
class MQAConfig(_PoolingConfig):
    """Args:
    init: "mean" (mean pooling of K/V, the default), "svd" (circuit-preserving fit, Q and O refit too) or
        "calibrated" (the same fit weighted by the inputs' statistics, needs `convert(..., calibration_data=...)`).
    """

    init: str = "mean"

    def validate(self) -> None:
        _check_init("mqa", self.init)

    @property
    def groups(self) -> int:
        return 1


@dataclass
class GQAConfig(_PoolingConfig):
    """Args:
    num_key_value_heads: G, the K/V heads after pooling (must divide the model's K/V heads).
    init: "mean" (mean pooling of K/V, the default), "svd" (circuit-preserving fit, Q and O refit too) or
        "calibrated" (the same fit weighted by the inputs' statistics, needs `convert(..., calibration_data=...)`).
    """

    num_key_value_heads: int | None = None
    init: str = "mean"

    def validate(self) -> None:
        _check_init("gqa", self.init)
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 1:
            raise ValueError(
                f"gqa option num_key_value_heads must be a positive int (required), got {self.num_key_value_heads!r}"
            )

    @property
    def groups(self) -> int:
        return self.num_key_value_heads


def prepare_pool(model: nn.Module, cfg: MQAConfig | GQAConfig, family: Family, calibration_data=None) -> None:
    if not family.native_gqa:  # the pooled model runs on the "mqa" implementation: the rule must accept it
        check_compatible(type(model), model.config, "mqa")
    if cfg.init == "mean":
        pool_kv(model, family, cfg.groups)
    elif cfg.init == "svd":
        fit_kv(model, family, cfg.groups)
    else:  # "calibrated": the statistics of the original's inputs (the model is still the original here)
        batches = list(calibration_data)  # read twice (an iterator once)
        moments = input_second_moments(model, family, batches)
        fit_kv(model, family, cfg.groups, moments, context=calibration_length(batches))


def attach_pool(model: nn.Module, cfg: MQAConfig | GQAConfig, family: Family) -> None:
    if not family.native_gqa:
        configure(model, kv_groups=cfg.groups)
        model.config._attn_implementation = "mqa"
        enable_mqa_key_pooling(model)  # per-head key norms (Persimmon's k_layernorm): pooled before the norm


def _needs_plugin(family: Family) -> bool:
    return not family.native_gqa


register_conversion_method("mqa", MQAConfig, attach_pool, prepare_pool, _needs_plugin)
register_conversion_method("gqa", GQAConfig, attach_pool, prepare_pool, _needs_plugin)
