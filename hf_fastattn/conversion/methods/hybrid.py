"""The LoLCATs sliding-window hybrid, shared by the learned-map methods (Hedgehog, T2R).

With `hybrid=True` a converted causal model attends with softmax over its last `window` keys and its first `sinks`
tokens (attention sinks) and with linear attention (the method's learned map) beyond them, the two mixed by a learned
per-head factor (`hf_fastattn.ops.hybrid`), in O(N (window + sinks)) for training, attention transfer and prefill.
Decoding keeps the linear state plus the sinks and the last `window` keys and values, so memory stays constant
(`hf_fastattn.RecurrentCache`).

Checkpoints saved before the `sinks`, `linear_weight` and `shared_feature_map` options existed load as they were
saved (no sinks, linear weight 1 - gamma, one shared map): options missing from a saved `fastattn_conversion` take
their old values (`LEGACY_VALUES`), not the new defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...integration.registry import configure
from ...ops.hybrid import LINEAR_WEIGHTS
from ..families import Family, attention_modules
from ..registry import MethodConfig, conversion_spec


@dataclass
class HybridOptions(MethodConfig):
    """Args:
    hybrid: LoLCATs sliding-window hybrid (causal models only).
    window: softmax window in tokens for the hybrid.
    window_init: the starting logit of each head's mixing factor, the softmax window's share being
        sigmoid(window_init): 0 weighs the window and the linear part 1/2 each, 4 gives the window 0.98. A
        window-heavy start keeps the converted model close to the original while the linear part trains.
    sinks: for the hybrid, the first `sinks` tokens also get softmax weights (StreamingLLM's attention sinks); 4 by
        default (measured: `hf_fastattn.ops.hybrid`), 0 for none.
    linear_weight: for the hybrid, the linear part's weight: "1-gamma" (the default) or "1" (LoLCATs' form).
    shared_feature_map: one learned map for queries and keys (True, the default) or two (False, LoLCATs' separate
        q and k maps, both starting from the method's init; hybrid only).

    The defaults of the last two, measured with the "hedgehog" recipe on the small teacher of `hf-fastattn bench
    conversion` (`benchmarks/bench_hybrid_options.py`, 4 sinks, 204800 uptraining tokens, validation perplexity
    against the teacher's): at 128 tokens all four settings score 0.9998x-1.0005x (the 64-token window carries them);
    at 512 tokens (the teacher trained at 128) "1-gamma" 0.845x (one map) / 0.843x (two) against "1" 0.900x / 0.890x.
    "1-gamma" is kept; two maps gain 0.2% for twice the map parameters, so one map stays the default. (The same with
    no sinks: 0.842x / 0.842x against 0.896x / 0.885x; this small teacher gains nothing from sinks after training,
    SmolLM2-135M's softmax window needs them, see `hf_fastattn.ops.hybrid`.)
    """

    hybrid: bool = False
    window: int = 64
    window_init: float = 0.0
    sinks: int = 4
    linear_weight: str = "1-gamma"
    shared_feature_map: bool = True

    def validate_hybrid(self, method: str) -> None:
        if not isinstance(self.hybrid, bool):
            raise ValueError(f"{method} option hybrid must be True or False, got {self.hybrid!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"{method} option window must be a positive int, got {self.window!r}")
        if isinstance(self.window_init, bool) or not isinstance(self.window_init, int | float) or not math.isfinite(
            self.window_init
        ):
            raise ValueError(f"{method} option window_init must be a finite number, got {self.window_init!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"{method} option sinks must be an int >= 0, got {self.sinks!r}")
        if self.linear_weight not in LINEAR_WEIGHTS:
            raise ValueError(
                f"{method} option linear_weight must be one of {list(LINEAR_WEIGHTS)}, got {self.linear_weight!r}"
            )
        if not isinstance(self.shared_feature_map, bool):
            raise ValueError(f"{method} option shared_feature_map must be True or False, got {self.shared_feature_map!r}")
        if not self.shared_feature_map and not self.hybrid:
            raise ValueError(
                f"{method} option shared_feature_map=False (separate q and k maps) needs hybrid=True; the plain linear "
                "attention uses one map"
            )


# the values of options added after checkpoints were first saved: what those checkpoints computed
LEGACY_VALUES = {"sinks": 0, "linear_weight": "1-gamma", "shared_feature_map": True}


def _as_saved(model: nn.Module, cfg: HybridOptions) -> HybridOptions:
    """`cfg` with the old values of options that a saved conversion being re-attached does not name."""
    saved = conversion_spec(model)
    if saved is None:  # a conversion now, not a checkpoint being loaded
        return cfg
    missing = {name: value for name, value in LEGACY_VALUES.items() if name not in saved}
    return dataclasses.replace(cfg, **missing) if missing else cfg


def attach_linear_attention(
    model: nn.Module, cfg: HybridOptions, family: Family, method: str, make_map
) -> None:
    """Give every attention module a learned feature map `make_map(module)` (and, for the hybrid, a per-head window
    factor, and with `shared_feature_map=False` a second map for the keys, `fastattn_feature_map_k`) and switch the model
    to "linear" attention, with the sliding window when `cfg.hybrid`."""
    cfg = _as_saved(model, cfg)
    if cfg.hybrid and not family.causal:
        raise ValueError(f"{method} option hybrid=True is for causal models; {family.name!r} is an encoder")
    for module in attention_modules(model, family):
        ref = next(module.parameters())
        module.fastattn_feature_map = make_map(module).to(device=ref.device, dtype=ref.dtype)
        if not cfg.shared_feature_map:
            module.fastattn_feature_map_k = make_map(module).to(device=ref.device, dtype=ref.dtype)
        if cfg.hybrid:
            # the logit of the window's share, learned per head (window_init 0: 1/2 each at the start)
            heads = module.fastattn_feature_map.num_heads
            module.fastattn_window_factor = nn.Parameter(
                torch.full((heads,), float(cfg.window_init), device=ref.device, dtype=ref.dtype)
            )
    if cfg.hybrid:
        configure(model, feature_map="elu", window=cfg.window, sinks=cfg.sinks, linear_weight=cfg.linear_weight)
    else:
        configure(model, feature_map="elu", window=None)
    model.config._attn_implementation = "linear"
