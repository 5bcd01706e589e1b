"""Hedgehog (Zhang et al. 2024) and the LoLCATs hybrid (Zhang et al. 2024, HazyResearch).

phi(x) = [softmax(x W + b), softmax(-(x W + b))] per head with W starting at the identity, one map per layer shared
by queries and keys. Stage 1 trains only the maps so that linear attention reproduces the softmax attention's outputs
(`distill.AttentionTransferTrainer`); stage 2 fine-tunes with LoRA. With `hybrid=True` the attention is LoLCATs'
sliding window: softmax over the last `window` keys, linear attention beyond, mixed by a learned per-head factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...integration.registry import configure
from ...ops.feature_maps import HedgehogFeatureMap
from ..core import MethodConfig, register_conversion_method
from ..families import Family, attention_modules, head_counts


@dataclass
class HedgehogConfig(MethodConfig):
    """Args:
    feature_dim: F per softmax half (phi has 2F features); None = head dim (W is then exactly the identity).
    hybrid: LoLCATs sliding-window hybrid (causal models only).
    window: softmax window in tokens for the hybrid.
    """

    feature_dim: int | None = None
    hybrid: bool = False
    window: int = 64

    def validate(self) -> None:
        if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim < 1):
            raise ValueError(
                f"hedgehog option feature_dim must be a positive int or None, got {self.feature_dim!r}"
            )
        if not isinstance(self.hybrid, bool):
            raise ValueError(f"hedgehog option hybrid must be True or False, got {self.hybrid!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"hedgehog option window must be a positive int, got {self.window!r}")


def attach_hedgehog(model: nn.Module, cfg: HedgehogConfig, family: Family) -> None:
    if cfg.hybrid and not family.causal:
        raise ValueError(f"hedgehog option hybrid=True is for causal models; {family.name!r} is an encoder")
    h, _, d = head_counts(model.config, family)
    for module in attention_modules(model, family):
        ref = next(module.parameters())
        module.fastattn_feature_map = HedgehogFeatureMap(h, d, cfg.feature_dim).to(
            device=ref.device, dtype=ref.dtype
        )
        if cfg.hybrid:
            # logit 0: softmax window and linear part weighted 1/2 each at the start, learned per head
            module.fastattn_window_factor = nn.Parameter(torch.zeros(h, device=ref.device, dtype=ref.dtype))
    configure(model, feature_map="elu", window=cfg.window if cfg.hybrid else None)
    model.config._attn_implementation = "linear"


register_conversion_method("hedgehog", HedgehogConfig, attach_hedgehog)
