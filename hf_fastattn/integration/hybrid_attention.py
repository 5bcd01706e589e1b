"""Transformers glue of the LoLCATs sliding-window hybrid: "linear" with the `window` option (softmax over the last
`window` keys, linear attention beyond; `hf_fastattn.ops.hybrid`), in the full forward and in recurrent decoding on a
`RecurrentCache` layer (the linear state plus the last `window` keys and values). Called by
`linear_attention_forward` when `config.fastattn["window"]` is set."""

from __future__ import annotations

import torch

from .common import _is_causal, _key_padding, check_supported


def _hybrid_forward(module, query, key, value, attention_mask, scaling, is_causal, fmap, window):
    from ..ops.hybrid import sliding_window_linear_attention

    check_supported(module, "linear")
    if not _is_causal(module, is_causal):
        raise ValueError("hf_fastattn 'linear' with option window (sliding-window hybrid) is causal only")
    mask = _key_padding(attention_mask, key.shape[2], "linear")
    out = sliding_window_linear_attention(
        query, key, value, feature_map=fmap, window=window, scaling=scaling, padding_mask=mask,
        window_factor=getattr(module, "fastattn_window_factor", None),
    )
    return out.transpose(1, 2).contiguous(), None


def _hybrid_recurrent_forward(module, layer, query, key, value, attention_mask, scaling, fmap, window):
    """Decoding the sliding-window hybrid on a `RecurrentCache` layer, which holds the linear state (S, z) of the keys
    that left the window and the last `window` keys and values themselves. The new tokens attend to those and to each
    other exactly as in the full forward (`sliding_window_linear_attention` with the state as `initial_state`); then
    the keys that are now more than `window` tokens back are folded into the state. Memory: the state plus `window`
    keys and values per layer, whatever the context."""
    check_supported(module, "linear")
    if not _is_causal(module, None):
        raise ValueError("hf_fastattn 'linear' with option window (sliding-window hybrid) is causal only")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"RecurrentCache: {query.shape[2]} queries but {key.shape[2]} new keys in layer {layer}")
    new_mask = _key_padding(attention_mask, key.shape[2], "linear")
    if new_mask is None:
        new_mask = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
    factor = getattr(module, "fastattn_window_factor", None)
    # a long prompt goes in pieces: each attends to at most `window` stored keys plus itself, O(n (window + piece))
    piece = max(window, _HYBRID_PREFILL_PIECE)
    outs = [
        _hybrid_step(layer, query[:, :, i : i + piece], key[:, :, i : i + piece], value[:, :, i : i + piece],
                     new_mask[:, i : i + piece].to(torch.bool), scaling, fmap, window, factor)
        for i in range(0, key.shape[2], piece)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


_HYBRID_PREFILL_PIECE = 256


def _hybrid_step(layer, query, key, value, mask, scaling, fmap, window, factor):
    from ..ops.hybrid import fold_window_state, hybrid_decode_step, sliding_window_linear_attention

    if layer.window_kv is None:
        # `window` empty slots (masked out) to start with: the bytes held never change
        b, hkv = key.shape[:2]
        layer.set_window(key.new_zeros(b, hkv, window, key.shape[-1]), value.new_zeros(b, hkv, window, value.shape[-1]),
                         torch.zeros(b, window, dtype=torch.bool, device=key.device))
    old_k, old_v, old_mask = layer.window_kv
    if old_k.shape[0] != key.shape[0] or old_k.shape[1] != key.shape[1]:
        raise ValueError(
            f"RecurrentCache: the stored window has batch {old_k.shape[0]} and {old_k.shape[1]} K/V heads, but this "
            f"forward has batch {key.shape[0]} and {key.shape[1]}: continue with the same batch size, or start a new cache."
        )
    if key.shape[2] == 1 and layer.state is not None:  # one decoding step
        out, kept, state = hybrid_decode_step(query, key, value, mask, layer.window_kv, layer.state, feature_map=fmap,
                                              window_factor=factor, scaling=scaling)
        layer.set_state(state)
        layer.set_window(*kept)
        return out
    key, value = torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2)
    mask = torch.cat([old_mask, mask], dim=1)
    state = layer.state
    out = sliding_window_linear_attention(
        query, key, value, feature_map=fmap, window=window, scaling=scaling, padding_mask=mask,
        window_factor=factor, initial_state=state,
    )
    leaving = key.shape[2] - window  # the oldest keys: beyond the window of every later query
    layer.set_state(fold_window_state(
        key[:, :, :leaving], value[:, :, :leaving], feature_map=fmap, num_heads=query.shape[1],
        padding_mask=mask[:, :leaving], state=state,
    ))
    key, value, mask = key[:, :, leaving:], value[:, :, leaving:], mask[:, leaving:]
    layer.set_window(key, value, mask)
    return out
