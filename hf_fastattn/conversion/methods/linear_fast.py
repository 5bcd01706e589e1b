""" "linear" and "fast": swap the attention function, no new parameters (fine-tuning optional)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...integration.registry import FastAttnOptions, configure
from ...ops.feature_maps import FEATURE_MAPS
from ..families import Family
from ..registry import MethodConfig, register_conversion_method


@dataclass
class LinearConfig(MethodConfig):
    """Args:
    feature_map: "elu" (elu + 1) or "relu".
    """

    feature_map: str = "elu"

    def validate(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"linear option feature_map={self.feature_map!r} is not one of {sorted(FEATURE_MAPS)}"
            )


@dataclass
class FastConfig(MethodConfig):
    """Args:
    order: Taylor order of exp in fastmax, 1 or 2.
    temperature: scores q_hat . k_hat / temperature.
    """

    order: int = 2
    temperature: float = 1.0

    def validate(self) -> None:
        FastAttnOptions(order=self.order, temperature=self.temperature)


def attach_linear(model: nn.Module, cfg: LinearConfig, family: Family) -> None:
    configure(model, feature_map=cfg.feature_map)
    model.config._attn_implementation = "linear"


def attach_fast(model: nn.Module, cfg: FastConfig, family: Family) -> None:
    configure(model, order=cfg.order, temperature=cfg.temperature)
    model.config._attn_implementation = "fast"


register_conversion_method("linear", LinearConfig, attach_linear)
register_conversion_method("fast", FastConfig, attach_fast)
