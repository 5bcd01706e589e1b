"""T2R (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs"): phi(x) = relu(W x + b), learned.

One map per layer, shared by queries and keys, with per-head weights, randomly initialized; then fine-tune (all
weights or attention only, see `hf_fastattn.conversion.distill`).

The paper fine-tunes the whole model from the start. `hf-fastattn bench conversion` (`RECIPES["t2r"]`) departs from
it where that measured better on a small token budget: a warm-up of the maps before fine-tuning (an attention
transfer in the Hedgehog / LoLCATs manner, here `UptrainConfig(transfer_mode="layer")`: the attention modules,
maps at a higher learning rate, regressed onto the original's outputs), more features than the paper's 32-64
(256 for a 32-dim head) and distillation of the original's logits during fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...integration.registry import configure
from ...ops.feature_maps import T2RFeatureMap
from ..core import MethodConfig, register_conversion_method
from ..families import Family, attention_modules, head_counts


@dataclass
class T2RConfig(MethodConfig):
    """Args:
    feature_dim: F, features per head (the paper uses 32 to 64).
    """

    feature_dim: int = 64

    def validate(self) -> None:
        if not isinstance(self.feature_dim, int) or self.feature_dim < 1:
            raise ValueError(f"t2r option feature_dim must be a positive int, got {self.feature_dim!r}")


def attach_t2r(model: nn.Module, cfg: T2RConfig, family: Family) -> None:
    h, _, d = head_counts(model.config, family)
    for module in attention_modules(model, family):
        ref = next(module.parameters())
        module.fastattn_feature_map = T2RFeatureMap(h, d, cfg.feature_dim).to(
            device=ref.device, dtype=ref.dtype
        )
    configure(model, feature_map="elu")
    model.config._attn_implementation = "linear"


register_conversion_method("t2r", T2RConfig, attach_t2r)
