"""Transformers glue of "sparse": softmax attention under a Child et al. (2019) pattern, with the
`sdpa_attention_forward` contract."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.sparse import SparsePattern, sparse_attention
from .common import _is_causal, _key_padding, check_backend, check_supported
from .variants import variant_options


@dataclass
class SparseOptions:
    """Options of "sparse" in `config.fastattn`."""

    pattern: str = field(default="strided", metadata={"help": '"strided" or "fixed" (Child et al. 2019).'})
    stride: int = field(default=128, metadata={"help": "period / block size."})
    local: int | None = field(default=None, metadata={"help": "strided: band width, default `stride`."})
    summary: int = field(default=1, metadata={"help": "fixed: summary keys per block."})
    backend: str = field(default="auto", metadata={"help": '"auto" | "torch" | "triton" kernels for the operators.'})

    def __post_init__(self):
        SparsePattern(self.pattern, self.stride, self.local, self.summary)
        check_backend(self.backend)


# the operator timed by `hf-fastattn bench attention` (causal, strided, stride 128)
BENCHMARKS = {
    "sparse": lambda q, k, v: sparse_attention(q, k, v, causal=True, pattern="strided", stride=128, backend="torch"),
}


def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"sparse": softmax attention under the Child et al. pattern of `config.fastattn` (pattern, stride, ...)."""
    check_supported(module, "sparse")
    options = variant_options(module.config, "sparse")
    mask = _key_padding(attention_mask, key.shape[2], "sparse")
    out = sparse_attention(
        query, key, value, causal=_is_causal(module, is_causal), pattern=options.pattern, stride=options.stride,
        local=options.local, summary=options.summary, scaling=scaling, padding_mask=mask, backend=options.backend,
        dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), None
