"""T2R (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs"): phi(x) = relu(W x + b), learned.

One map per layer, shared by queries and keys, with per-head weights; then fine-tune (all weights or attention only,
see `hf_fastattn.conversion.distill`).
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
