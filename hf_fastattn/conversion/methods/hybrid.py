"""The LoLCATs sliding-window hybrid, shared by the learned-map methods (Hedgehog, T2R).

With `hybrid=True` a converted causal model attends with softmax over its last `window` keys and with linear
attention (the method's learned map) beyond them, the two mixed by a learned per-head factor
(`hf_fastattn.ops.hybrid`). Decoding keeps the linear state plus the last `window` keys and values, so memory stays
constant (`hf_fastattn.RecurrentCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...integration.registry import configure
from ..core import MethodConfig
from ..families import Family, attention_modules


@dataclass
class HybridOptions(MethodConfig):
    """Args:
    hybrid: LoLCATs sliding-window hybrid (causal models only).
    window: softmax window in tokens for the hybrid.
    window_init: the starting logit of each head's mixing factor, the softmax window's share being
        sigmoid(window_init): 0 weighs the window and the linear part 1/2 each, 4 gives the window 0.98. A
        window-heavy start keeps the converted model close to the original while the linear part trains.
    """

    hybrid: bool = False
    window: int = 64
    window_init: float = 0.0

    def validate_hybrid(self, method: str) -> None:
        if not isinstance(self.hybrid, bool):
            raise ValueError(f"{method} option hybrid must be True or False, got {self.hybrid!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"{method} option window must be a positive int, got {self.window!r}")
        if isinstance(self.window_init, bool) or not isinstance(self.window_init, int | float) or not math.isfinite(
            self.window_init
        ):
            raise ValueError(f"{method} option window_init must be a finite number, got {self.window_init!r}")


def attach_linear_attention(
    model: nn.Module, cfg: HybridOptions, family: Family, method: str, make_map
) -> None:
    """Give every attention module a learned feature map `make_map()` (and, for the hybrid, a per-head window
    factor) and switch the model to "linear" attention, with the sliding window when `cfg.hybrid`."""
    if cfg.hybrid and not family.causal:
        raise ValueError(f"{method} option hybrid=True is for causal models; {family.name!r} is an encoder")
    for module in attention_modules(model, family):
        ref = next(module.parameters())
        module.fastattn_feature_map = make_map().to(device=ref.device, dtype=ref.dtype)
        if cfg.hybrid:
            # the logit of the window's share, learned per head (window_init 0: 1/2 each at the start)
            heads = module.fastattn_feature_map.num_heads
            module.fastattn_window_factor = nn.Parameter(
                torch.full((heads,), float(cfg.window_init), device=ref.device, dtype=ref.dtype)
            )
    configure(model, feature_map="elu", window=cfg.window if cfg.hybrid else None)
    model.config._attn_implementation = "linear"
