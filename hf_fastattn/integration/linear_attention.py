"""Transformers glue of "linear" (Katharopoulos et al. 2020: elu+1, relu, or a learned T2R / Hedgehog map), with the
`sdpa_attention_forward` contract (see `registry.py`), and the recurrent-state math that "fast" shares: decoding on a
`RecurrentCache` layer (`_recurrent_forward`) and queries that are only the last Nq of N positions (a plain K/V cache,
`_suffix_queries`). With the `window` option "linear" is the LoLCATs sliding-window hybrid (`hybrid_attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.common import repeat_kv, use_triton
from ..ops.dropout import key_dropout
from ..ops.feature_maps import FEATURE_MAPS, get_feature_map
from ..ops.linear import (
    chunk_linear_attention,
    linear_attention,
    linear_attention_with_state,
    recurrent_linear_step_,
    state_updatable_in_place,
)
from .common import _is_causal, _key_padding, check_backend, check_chunk_size, check_supported
from .hybrid_attention import _hybrid_forward, _hybrid_recurrent_forward
from .variants import variant_options


@dataclass
class LinearOptions:
    """Options of "linear" in `config.fastattn`."""

    feature_map: str = field(
        default="elu",
        metadata={"help": '"elu" (elu + 1) or "relu"; learned maps (T2R, Hedgehog) are set by conversion.',
                  "state": True},
    )
    chunk_size: int | None = field(
        default=None,
        metadata={"help": "tokens per chunk of the chunked causal form (None: 64, or 256 for large feature maps)."},
    )
    backend: str = field(default="auto", metadata={"help": '"auto" | "torch" | "triton" kernels for the operators.'})
    window: int | None = field(
        default=None,
        metadata={
            "help": "causal only: LoLCATs hybrid, softmax over the last `window` keys and linear attention beyond "
            "(`hf_fastattn.ops.hybrid`; the per-head mix is the module's `fastattn_window_factor`). None: plain linear.",
            "state": True,
        },
    )
    sinks: int = field(
        default=4,
        metadata={
            "help": "with `window`: the first `sinks` real tokens also get softmax weights for every later query "
            "(StreamingLLM's attention sinks); 4 by default (measured, see `hf_fastattn.ops.hybrid`), 0 for none.",
            "state": True,
        },
    )
    linear_weight: str = field(
        default="1-gamma",
        metadata={"help": 'with `window`: the linear part\'s weight, "1-gamma" (a convex mix with the window\'s share '
                  'gamma, the default) or "1" (LoLCATs\' form).', "state": True},
    )

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"fastattn option feature_map={self.feature_map!r} is not one of {sorted(FEATURE_MAPS)}")
        check_chunk_size(self.chunk_size)
        check_backend(self.backend)
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"fastattn option window must be a positive int or None, got {self.window!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"fastattn option sinks must be an int >= 0, got {self.sinks!r}")
        if self.linear_weight not in ("1-gamma", "1"):
            raise ValueError(f"fastattn option linear_weight must be '1-gamma' or '1', got {self.linear_weight!r}")


# the operator timed by `hf-fastattn bench attention` (causal, elu+1)
BENCHMARKS = {"linear": lambda q, k, v: linear_attention(q, k, v, causal=True, backend="torch")}


def feature_map_of(module: torch.nn.Module, options) -> object:
    """The learned feature map attached by conversion (`module.fastattn_feature_map`), else the configured one."""
    return getattr(module, "fastattn_feature_map", None) or options.feature_map


def _linear_like(module, query, key, value, attention_mask, is_causal, implementation, run):
    """Shared body of "linear" and "fast": padding, and queries that are only the last Nq of N positions."""
    check_supported(module, implementation)
    mask = _key_padding(attention_mask, key.shape[2], implementation)
    causal = _is_causal(module, is_causal)
    nq, n = query.shape[2], key.shape[2]
    if nq == n:
        out = run(query, key, value, causal, mask)
    elif causal and nq < n:
        out = _suffix_queries(query, key, value, mask, run)
    else:
        raise ValueError(f"hf_fastattn {implementation!r}: {nq} queries against {n} keys is only supported causally")
    return out.transpose(1, 2).contiguous(), None


def _suffix_queries(query, key, value, mask, run):
    """Causal queries at the last Nq of N positions (decoding with a plain K/V cache): the earlier keys are summed
    into one state in O(N), then the queries attend causally to their own tokens on top of it."""
    nq, n = query.shape[2], key.shape[2]
    prefix_mask = None if mask is None else mask[:, : n - nq]
    suffix_mask = None if mask is None else mask[:, n - nq :]
    return run(query, key[:, :, n - nq :], value[:, :, n - nq :], True, suffix_mask, (key[:, :, : n - nq], value[:, :, : n - nq], prefix_mask))


def linear_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """"linear": Katharopoulos et al. elu+1 (or relu, or a learned map). `scaling` is not used: phi sees q, k as given."""
    value = key_dropout(value, dropout)  # attention dropout as whole keys dropped for every query (ops/dropout.py)
    options = variant_options(module.config, "linear")
    fmap = feature_map_of(module, options)
    layer = getattr(module, "fastattn_recurrent_layer", None)
    if layer is not None:
        if options.window is not None:
            return _hybrid_recurrent_forward(module, layer, query, key, value, attention_mask, scaling, fmap, options.window)
        return _recurrent_forward(module, layer, query, key, value, attention_mask, "linear", options, fmap)
    if options.window is not None:
        return _hybrid_forward(module, query, key, value, attention_mask, scaling, is_causal, fmap, options.window)

    def run(q, k, v, causal, mask, prefix=None):
        if prefix is None:
            return linear_attention(
                q, k, v, causal=causal, feature_map=fmap, padding_mask=mask, chunk_size=options.chunk_size,
                backend=options.backend,
            )
        return _with_prefix_state(q, k, v, mask, prefix, fmap, options)

    return _linear_like(module, query, key, value, attention_mask, is_causal, "linear", run)


def _recurrent_forward(module, layer, query, key, value, attention_mask, implementation, options, fmap,
                       normalize=None, intra=None, step_=None, with_state=None):
    """Decoding on a `RecurrentCache` layer: key/value hold only the new tokens; their features are folded into the
    layer's state (S, z). One token: `recurrent_linear_step`, O(F Dv) per head. Several (prefill, Jacobi guesses):
    the chunked form started from the stored state. Padded keys (2D mask) never enter the state. A family with its
    own operators passes them: `step_(query, key, value, mask, state) -> out` for the in-place one-token step and
    `with_state(query, key, value, mask, state) -> (out, state)` for the rest, on the raw query and key."""
    check_supported(module, implementation)
    if not _is_causal(module, None):
        raise ValueError(f"hf_fastattn {implementation!r}: a RecurrentCache serves causal attention only")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"RecurrentCache: {query.shape[2]} queries but {key.shape[2]} new keys in layer {layer}")
    mask = _key_padding(attention_mask, key.shape[2], implementation)
    phi = get_feature_map(fmap)
    if getattr(phi, "per_head", False) and key.shape[1] != query.shape[1]:
        # one learned map per query head: the state is kept per query head
        key, value = repeat_kv(key, query.shape[1]), repeat_kv(value, query.shape[1])
    state = layer.state
    if state is not None and (state[0].shape[0] != key.shape[0] or state[0].shape[1] != key.shape[1]
                              or state[0].shape[-1] != value.shape[-1]):
        raise ValueError(
            f"RecurrentCache: the stored state has batch {state[0].shape[0]}, {state[0].shape[1]} heads and value dim "
            f"{state[0].shape[-1]}, but this forward has batch {key.shape[0]}, {key.shape[1]} heads and value dim "
            f"{value.shape[-1]}: continue with the same batch size (and model), or start a new cache."
        )
    q, k = query.float(), key.float()
    if normalize is not None:
        q, k = normalize(q), normalize(k)
    if _steps_in_place(q, k, value, state, options.backend):
        # one token at inference: the step updates the layer's own state tensors (no new state, no copy back)
        if step_ is not None:
            out = step_(query, key, value, mask, state)
        else:
            kf = phi(k) if mask is None else phi(k) * mask[:, None, :, None]
            out = recurrent_linear_step_(phi(q), kf, value, state)
        return out.transpose(1, 2).contiguous(), None
    if with_state is not None:
        out, state = with_state(query, key, value, mask, state)
        layer.set_state(state)
        return out.transpose(1, 2).contiguous(), None
    # one token: the recurrent step; several (prefill, Jacobi guesses): the chunked form from the stored state
    out, state = linear_attention_with_state(
        q, k, value, causal=True, feature_map=phi, padding_mask=mask, initial_state=state, output_final_state=True,
        chunk_size=options.chunk_size, backend=options.backend, intra_weights=intra,
    )
    layer.set_state(state)
    return out.transpose(1, 2).contiguous(), None


def _steps_in_place(q, k, value, state, backend) -> bool:
    """Whether a recurrent forward is one token that `recurrent_linear_step_` can fold into the stored state in place:
    inference (no autograd), a float32 state held contiguously, the PyTorch backend."""
    if q.shape[2] != 1 or state is None or torch.is_grad_enabled() or not state_updatable_in_place(state):
        return False
    return not use_triton(backend, q, k, value)


def _with_prefix_state(q, k, v, mask, prefix, fmap, options):
    phi = get_feature_map(fmap)
    pk, pv, pmask = prefix
    if getattr(phi, "per_head", False) and k.shape[1] != q.shape[1]:
        k, v, pk, pv = (repeat_kv(x, q.shape[1]) for x in (k, v, pk, pv))
    kf_prefix = phi(pk.float())
    if pmask is not None:
        kf_prefix = kf_prefix * pmask[:, None, :, None]
    state = (kf_prefix.transpose(-1, -2) @ pv.float(), kf_prefix.sum(2))
    kf = phi(k.float())
    if mask is not None:
        kf = kf * mask[:, None, :, None]
    out, _ = chunk_linear_attention(
        phi(q.float()), kf, v, causal=True, initial_state=state, chunk_size=options.chunk_size, backend=options.backend
    )
    return out
