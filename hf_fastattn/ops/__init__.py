"""Attention operators on the layout HF attention functions receive: q `[B, H, N, D]`, k/v `[B, Hkv, N, D]`.

Each family has an efficient form here and a naive quadratic reference in `reference.py`.
"""

from .fast import fast_attention, fast_feature_map
from .feature_maps import EluFeatureMap, FastmaxFeatureMap, FeatureMap, ReluFeatureMap, get_feature_map
from .linear import (
    causal_linear_attention,
    chunk_linear_attention,
    linear_attention,
    recurrent_linear_step,
)
from .sparse import SparsePattern, sparse_attention

__all__ = [
    "EluFeatureMap",
    "FastmaxFeatureMap",
    "FeatureMap",
    "ReluFeatureMap",
    "SparsePattern",
    "causal_linear_attention",
    "chunk_linear_attention",
    "fast_attention",
    "fast_feature_map",
    "get_feature_map",
    "linear_attention",
    "recurrent_linear_step",
    "sparse_attention",
]
