"""Transformers glue of the LoLCATs sliding-window hybrid: "linear" with the `window` option (softmax over the last
`window` keys and the first `sinks` tokens, linear attention beyond; `hf_fastattn.ops.hybrid`), in the full forward
(O(N (window + sinks)), chunked) and in recurrent decoding on a `RecurrentCache` layer (the linear state, the last
`window` keys and values, and `sinks` sink slots). Called by `linear_attention_forward` when `config.fastattn["window"]`
is set. A converted model may carry a separate key map, `module.fastattn_feature_map_k` (LoLCATs' separate q and k
maps); `fastattn_feature_map` is then the queries' map."""

from __future__ import annotations

import torch

from ..ops.hybrid_ring import hybrid_ring_step_
from ..ops.linear import state_updatable_in_place
from .common import _is_causal, _key_padding, check_supported
from .variants import variant_options

KEY_MAP_ATTRIBUTE = "fastattn_feature_map_k"


def _hybrid_options(module):
    options = variant_options(module.config, "linear")
    return options.sinks, options.linear_weight, options.chunk_size, getattr(module, KEY_MAP_ATTRIBUTE, None)


def _hybrid_forward(module, query, key, value, attention_mask, scaling, is_causal, fmap, window):
    from ..ops.hybrid import sliding_window_linear_attention

    check_supported(module, "linear")
    if not _is_causal(module, is_causal):
        raise ValueError("hf_fastattn 'linear' with option window (sliding-window hybrid) is causal only")
    mask = _key_padding(attention_mask, key.shape[2], "linear")
    sinks, linear_weight, chunk_size, key_map = _hybrid_options(module)
    out = sliding_window_linear_attention(
        query, key, value, feature_map=fmap, window=window, scaling=scaling, padding_mask=mask,
        window_factor=getattr(module, "fastattn_window_factor", None), sinks=sinks, key_feature_map=key_map,
        linear_weight=linear_weight, chunk_size=chunk_size,
    )
    return out.transpose(1, 2).contiguous(), None


def _hybrid_recurrent_forward(module, layer, query, key, value, attention_mask, scaling, fmap, window):
    """Decoding the sliding-window hybrid on a `RecurrentCache` layer, which holds the linear state (S, z) of the keys
    that left the window, the first `sinks` real keys and values (sink slots) and the last `window` keys and values
    themselves. The new tokens attend to those and to each other exactly as in the full forward
    (`sliding_window_linear_attention` with the state as `initial_state` and the sinks as `sink_kv`); then the keys
    that are now more than `window` tokens back take the free sink slots or are folded into the state. Memory: the
    state plus `sinks + window` keys and values per layer, whatever the context."""
    check_supported(module, "linear")
    if not _is_causal(module, None):
        raise ValueError("hf_fastattn 'linear' with option window (sliding-window hybrid) is causal only")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"RecurrentCache: {query.shape[2]} queries but {key.shape[2]} new keys in layer {layer}")
    new_mask = _key_padding(attention_mask, key.shape[2], "linear")
    if new_mask is None:
        new_mask = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    factor = getattr(module, "fastattn_window_factor", None)
    options = _hybrid_options(module)
    # a long prompt in one call (the chunked form is O(n (window + sinks)) in time and memory), or in pieces of
    # `_HYBRID_PREFILL_PIECE` tokens when set (the tests feed pieces to check they give the same state)
    piece = _HYBRID_PREFILL_PIECE or key.shape[2]
    outs = [
        _hybrid_step(layer, query[:, :, i : i + piece], key[:, :, i : i + piece], value[:, :, i : i + piece],
                     new_mask[:, i : i + piece].to(torch.bool), scaling, fmap, window, factor, options)
        for i in range(0, key.shape[2], piece)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# None: a prefill in one call (before the chunked form, prompts went in pieces of 256 tokens)
_HYBRID_PREFILL_PIECE: int | None = None


def _ring_for_step(query, key, layer, sinks: int):
    """The layer's `HybridRing` when this hybrid forward is one token that `hybrid_ring_step_` can take in place
    (inference, float32 keys and state held contiguously, a window held and every sink slot filled:
    `RecurrentStateLayer.take_ring`), else None: anything else (a batch or sink count that does not match included)
    takes the general path, which names the mismatch."""
    if query.shape[2] != 1 or torch.is_grad_enabled() or key.dtype != torch.float32:
        return None
    state = layer.state
    if state is None or not state_updatable_in_place(state) or state[0].shape[0] != key.shape[0]:
        return None
    ring = layer.take_ring()
    return ring if ring is not None and ring.keys.shape[:2] == key.shape[:2] and ring.sinks == sinks else None


def _hybrid_step(layer, query, key, value, mask, scaling, fmap, window, factor, options=(0, "1-gamma", None, None)):
    """One piece of new tokens on the layer's held state (`hf_fastattn.ops.hybrid.hybrid_attention_with_state`)."""
    from ..ops.hybrid import HybridState, empty_hybrid_state, hybrid_attention_with_state

    sinks, linear_weight, chunk_size, key_map = options
    ring = _ring_for_step(query, key, layer, sinks)
    if ring is not None:
        # one token at inference, every sink slot filled: the layer's ring and state are updated in place
        out, layer.ring = hybrid_ring_step_(
            query, key, value, mask, ring, layer.state, feature_map=fmap, window_factor=factor,
            scaling=scaling, key_feature_map=key_map, linear_weight=linear_weight,
        )
        return out
    if layer.window_kv is None:
        # `window` empty slots (masked out) to start with, and `sinks` empty sink slots: the bytes held never change
        empty = empty_hybrid_state(key, value, window, sinks)
        layer.set_window(*empty.window)
        layer.set_sinks(*empty.sinks if empty.sinks is not None else (None, None, None))
    old_k = layer.window_kv[0]
    if old_k.shape[0] != key.shape[0] or old_k.shape[1] != key.shape[1]:
        raise ValueError(
            f"RecurrentCache: the stored window has batch {old_k.shape[0]} and {old_k.shape[1]} K/V heads, but this "
            f"forward has batch {key.shape[0]} and {key.shape[1]}: continue with the same batch size, or start a new cache."
        )
    sink_kv = layer.sink_kv
    if (0 if sink_kv is None else sink_kv[0].shape[2]) != sinks:
        raise ValueError(
            f"RecurrentCache: the layer holds {0 if sink_kv is None else sink_kv[0].shape[2]} sink slots but the "
            f"model's fastattn option sinks is {sinks}: start a new cache after changing it."
        )
    out, state = hybrid_attention_with_state(
        query, key, value, feature_map=fmap, window=window, window_factor=factor, scaling=scaling, padding_mask=mask,
        sinks=sinks, key_feature_map=key_map, linear_weight=linear_weight, chunk_size=chunk_size,
        initial_state=HybridState(layer.window_kv, layer.state, sink_kv), output_final_state=True,
    )
    layer.set_state(state.linear)
    layer.set_window(*state.window)
    if state.sinks is not None:
        layer.set_sinks(*state.sinks)
    return out
