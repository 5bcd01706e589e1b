"""T2R (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs"): phi(x) = relu(W x + b), learned.

One map per layer, shared by queries and keys, with per-head weights, randomly initialized; then fine-tune (all
weights or attention only, see `hf_fastattn.conversion.distill`). With `hybrid=True` (not in the paper) the map's
linear attention serves the keys beyond a softmax window over the last `window` tokens (LoLCATs' hybrid, see
`methods/hybrid.py`).

The paper fine-tunes the whole model from the start. `hf-fastattn bench conversion` (`RECIPES["t2r"]` and
`RECIPES["t2r-hybrid"]`) departs from it where that measured better on a small token budget: a warm-up of the maps
before fine-tuning (an attention transfer in the Hedgehog / LoLCATs manner, here
`UptrainConfig(transfer_mode="layer")`: the attention modules, maps at a higher learning rate, regressed onto the
original's outputs), distillation of the original's logits during fine-tuning, and for the pure form Hedgehog's
attention-score loss in the warm-up (`UptrainConfig.transfer_score_weight`), hidden-state distillation during
fine-tuning (`distill_hidden_weight`) and more features than the paper's 32-64 (1024 for a 32-dim head).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...ops.feature_maps import T2RFeatureMap
from ..families import Family, module_heads
from ..registry import register_conversion_method
from .hybrid import HybridOptions, attach_linear_attention


@dataclass
class T2RConfig(HybridOptions):
    """Args:
    feature_dim: F, features per head (the paper uses 32 to 64).
    hybrid: LoLCATs sliding-window hybrid (causal models only): softmax over the last `window` keys, T2R's linear
        attention beyond them. Not in the T2R paper.
    window: softmax window in tokens for the hybrid.
    window_init: starting logit of the window's share in the hybrid (see `HybridOptions`).
    """

    feature_dim: int = 64

    def validate(self) -> None:
        if not isinstance(self.feature_dim, int) or self.feature_dim < 1:
            raise ValueError(f"t2r option feature_dim must be a positive int, got {self.feature_dim!r}")
        self.validate_hybrid("t2r")


def attach_t2r(model: nn.Module, cfg: T2RConfig, family: Family) -> None:
    def make_map(module: nn.Module) -> T2RFeatureMap:
        h, _, d = module_heads(module, model.config)  # per module: layers may differ in heads or head dim
        return T2RFeatureMap(h, d, cfg.feature_dim)

    attach_linear_attention(model, cfg, family, "t2r", make_map)


register_conversion_method("t2r", T2RConfig, attach_t2r)
