"""Hedgehog (Zhang et al. 2024) and the LoLCATs hybrid (Zhang et al. 2024, HazyResearch).

phi(x) = [softmax(x W + b), softmax(-(x W + b))] per head with W starting at the identity, one map per layer shared
by queries and keys. Stage 1 trains only the maps so that linear attention reproduces the softmax attention's outputs
(`distill.AttentionTransferTrainer`); stage 2 fine-tunes with LoRA. With `hybrid=True` the attention is LoLCATs'
sliding window: softmax over the last `window` keys, linear attention beyond, mixed by a learned per-head factor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...ops.feature_maps import HedgehogFeatureMap
from ..families import Family, module_heads
from ..registry import register_conversion_method
from .hybrid import HybridOptions, attach_linear_attention


@dataclass
class HedgehogConfig(HybridOptions):
    """Args:
    feature_dim: F per softmax half (phi has 2F features); None = head dim (W is then exactly the identity).
    hybrid: LoLCATs sliding-window hybrid (causal models only).
    window: softmax window in tokens for the hybrid.
    window_init: starting logit of the window's share in the hybrid (see `HybridOptions`).
    """

    feature_dim: int | None = None

    def validate(self) -> None:
        if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim < 1):
            raise ValueError(
                f"hedgehog option feature_dim must be a positive int or None, got {self.feature_dim!r}"
            )
        self.validate_hybrid("hedgehog")


def attach_hedgehog(model: nn.Module, cfg: HedgehogConfig, family: Family) -> None:
    def make_map(module: nn.Module) -> HedgehogFeatureMap:
        h, _, d = module_heads(module, model.config)  # per module: layers may differ in heads or head dim
        return HedgehogFeatureMap(h, d, cfg.feature_dim)

    attach_linear_attention(model, cfg, family, "hedgehog", make_map)


register_conversion_method("hedgehog", HedgehogConfig, attach_hedgehog)
