"""Transformers glue of "fast" (FAST's fastmax of order 1 or 2), with the `sdpa_attention_forward` contract; its
recurrent decoding is `linear_attention._recurrent_forward` with fastmax's feature map."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.common import fast_normalize
from ..ops.dropout import key_dropout
from ..ops.fast import (
    fast_attention,
    fast_attention_with_state,
    fast_feature_map,
    fast_recurrent_step_,
    validate_fast_options,
)
from .common import check_backend, check_chunk_size
from .linear_attention import _linear_like, _recurrent_forward, _with_prefix_state
from .variants import variant_options


@dataclass
class FastOptions:
    """Options of "fast" in `config.fastattn`."""

    order: int = field(default=2, metadata={"help": "Taylor order of exp, 1 or 2.", "state": True})
    temperature: float = field(
        default=1.0, metadata={"help": "s = q_hat . k_hat / temperature (> 0; >= 1 for order 1).", "state": True}
    )
    chunk_size: int | None = field(
        default=None,
        metadata={"help": "tokens per chunk of the chunked causal form (None: 64, or 256 for large feature maps)."},
    )
    backend: str = field(default="auto", metadata={"help": '"auto" | "torch" | "triton" kernels for the operators.'})

    def __post_init__(self):
        validate_fast_options(self.order, self.temperature)
        check_chunk_size(self.chunk_size)
        check_backend(self.backend)


# the operators timed by `hf-fastattn bench attention` (causal, order 1 and 2)
BENCHMARKS = {
    "fast-1": lambda q, k, v: fast_attention(q, k, v, causal=True, order=1, backend="torch"),
    "fast-2": lambda q, k, v: fast_attention(q, k, v, causal=True, order=2, backend="torch"),
}


def fast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"fast": FAST fastmax of order 1 or 2. `scaling` is not used: q and k are normalized, `temperature` scales."""
    value = key_dropout(value, dropout)  # attention dropout as whole keys dropped for every query (ops/dropout.py)
    options = variant_options(module.config, "fast")
    layer = getattr(module, "fastattn_recurrent_layer", None)
    if layer is not None:

        def step_(q, k, v, mask, state):  # one token at inference, the layer's state updated in place
            return fast_recurrent_step_(
                q, k, v, state, order=options.order, temperature=options.temperature, padding_mask=mask
            )

        def with_state(q, k, v, mask, state):  # prefill, several guessed tokens, or a step under autograd
            return fast_attention_with_state(
                q, k, v, causal=True, order=options.order, temperature=options.temperature, padding_mask=mask,
                initial_state=state, output_final_state=True, chunk_size=options.chunk_size, backend=options.backend,
            )

        return _recurrent_forward(
            module, layer, query, key, value, attention_mask, "fast", options,
            fast_feature_map(options.order, options.temperature), normalize=fast_normalize, step_=step_,
            with_state=with_state,
        )

    def run(q, k, v, causal, mask, prefix=None):
        if prefix is None:
            return fast_attention(
                q, k, v, causal=causal, order=options.order, temperature=options.temperature, padding_mask=mask,
                chunk_size=options.chunk_size, backend=options.backend,
            )
        pk, pv, pmask = prefix
        fmap = fast_feature_map(options.order, options.temperature)
        return _with_prefix_state(
            fast_normalize(q.float()), fast_normalize(k.float()), v, mask,
            (fast_normalize(pk.float()), pv, pmask), fmap, options,
        )

    return _linear_like(module, query, key, value, attention_mask, is_causal, "fast", run)
