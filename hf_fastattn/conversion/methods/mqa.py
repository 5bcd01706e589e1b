""" "mqa" and "gqa" (Ainslie et al. 2023): mean-pool the K and V projections within each group of heads.

Llama, Mistral, Qwen2 and Qwen3 become standard checkpoints with `config.num_key_value_heads = G` (they load without
hf_fastattn). GPT-2 and BERT have no native GQA: every head of a group gets its group's mean K/V weights and the
"mqa" attention function (`kv_groups = G`) runs them with G K/V heads; the heads stay tied during fine-tuning because
the function pools them (identical gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...integration.registry import configure
from ..core import MethodConfig, register_conversion_method
from ..families import Family, pool_kv


@dataclass
class MQAConfig(MethodConfig):
    """ "mqa": one K/V head. No options."""

    @property
    def groups(self) -> int:
        return 1


@dataclass
class GQAConfig(MethodConfig):
    """Args:
    num_key_value_heads: G, the K/V heads after pooling (must divide the model's K/V heads).
    """

    num_key_value_heads: int | None = None

    def validate(self) -> None:
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 1:
            raise ValueError(
                f"gqa option num_key_value_heads must be a positive int (required), got {self.num_key_value_heads!r}"
            )

    @property
    def groups(self) -> int:
        return self.num_key_value_heads


def prepare_pool(model: nn.Module, cfg: MQAConfig | GQAConfig, family: Family) -> None:
    pool_kv(model, family, cfg.groups)


def attach_pool(model: nn.Module, cfg: MQAConfig | GQAConfig, family: Family) -> None:
    if not family.native_gqa:
        configure(model, kv_groups=cfg.groups)
        model.config._attn_implementation = "mqa"


def _needs_plugin(family: Family) -> bool:
    return not family.native_gqa


register_conversion_method("mqa", MQAConfig, attach_pool, prepare_pool, _needs_plugin)
register_conversion_method("gqa", GQAConfig, attach_pool, prepare_pool, _needs_plugin)
