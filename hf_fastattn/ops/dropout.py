"""Attention dropout for the O(N) operators ("linear", "fast").

sdpa drops every normalized weight a_ij = w_ij / sum_l w_il on its own: kept with probability 1 - p and then scaled
by 1 / (1 - p). A mask that depends on both i and j cannot go through the state sum_j phi(k_j) v_j^T that makes
linear attention O(N): every query would need a state of its own. So "linear" and "fast" drop keys instead: one
Bernoulli(1 - p) draw m_j per (batch row, K/V head, key), shared by every query, applied after normalization as
sdpa's is (the denominators still count every key):

    out_i = sum_j a_ij (m_j / (1 - p)) v_j

That is dropout of whole rows of v. Each weight is kept with probability 1 - p and rescaled as in sdpa, so the
expected output is the output without dropout; unlike sdpa, a key dropped for one query is dropped for all of them
(in that forward), and the query heads of one K/V group (GQA) share their group's mask. A dropped key never enters
a recurrent state either, so the chunked, bidirectional and recurrent forms all see the same mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_dropout_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"attention dropout must be a probability in [0, 1], got {p!r}")


def key_dropout(v: torch.Tensor, p: float) -> torch.Tensor:
    """Drop each key's value row with probability `p` and scale the kept rows by 1 / (1 - p) (see the module docs).

    Args:
        v: values `[B, Hkv, N, Dv]`.
        p: the dropout probability in [0, 1]; 0 returns `v` itself. Applied whenever `p > 0`: callers pass 0
            outside training, as transformers' attention modules do (`dropout=0.0 if not self.training else ...`).

    Returns:
        `[B, Hkv, N, Dv]`, differentiable in `v`.
    """
    check_dropout_p(p)
    if p == 0:
        return v
    keep = F.dropout(v.new_ones(*v.shape[:-1], 1), p=float(p), training=True)  # 0 or 1 / (1 - p) per key
    return v * keep


__all__ = ["check_dropout_p", "key_dropout"]
