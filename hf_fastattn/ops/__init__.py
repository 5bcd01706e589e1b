"""Attention operators on the layout HF attention functions receive: q `[B, H, N, D]`, k/v `[B, Hkv, N, D]`.

Each family (linear, fast, sparse, hybrid) exposes one state-in / state-out entry point,
`<family>_attention_with_state(q, k, v, ..., initial_state=None, output_final_state=False) -> (o, final_state)`
(fla's `ops/linear_attn` signature), which chooses the Triton kernels or PyTorch in one place; `linear_attention`,
`fast_attention` and `sparse_attention` are their output-only forms. Shared helpers live in `common.py`; the naive
quadratic references in `reference.py` are for tests, and nothing in the library imports them.
"""

from .fast import fast_attention, fast_attention_with_state, fast_feature_map, fast_recurrent_step_
from .feature_maps import EluFeatureMap, FastmaxFeatureMap, FeatureMap, ReluFeatureMap, get_feature_map
from .hybrid import HybridState, hybrid_attention_with_state, sliding_window_linear_attention
from .linear import (
    causal_linear_attention,
    chunk_linear_attention,
    linear_attention,
    linear_attention_with_state,
    recurrent_linear_step,
    recurrent_linear_step_,
)
from .sparse import SparsePattern, sparse_attention, sparse_attention_with_state

__all__ = [
    "EluFeatureMap",
    "FastmaxFeatureMap",
    "FeatureMap",
    "HybridState",
    "ReluFeatureMap",
    "SparsePattern",
    "causal_linear_attention",
    "chunk_linear_attention",
    "fast_attention",
    "fast_attention_with_state",
    "fast_recurrent_step_",
    "fast_feature_map",
    "get_feature_map",
    "hybrid_attention_with_state",
    "linear_attention",
    "linear_attention_with_state",
    "recurrent_linear_step",
    "recurrent_linear_step_",
    "sliding_window_linear_attention",
    "sparse_attention",
    "sparse_attention_with_state",
]
