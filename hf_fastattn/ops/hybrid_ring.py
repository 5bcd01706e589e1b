"""Decoding the LoLCATs hybrid one token at a time with every held tensor updated in place (inference only).

`hybrid_decode_step` (`hybrid.py`) returns a new window, new sinks and a new linear state each step: about 270 small
operations per layer, 1.0-1.4 ms per SmolLM2-135M layer on one CPU thread against 0.11 ms for a linear layer's
in-place step, so a hybrid decoded 20-40 ms per token slower than plain linear attention. Here the softmax part's
keys live in one ring of `sinks + window` slots (`HybridRing`): the sinks first, then the window's slots in ring order
(the oldest at `sinks + start`). A step folds the oldest window key into the linear state (`addcmul_`), writes the new
token over its slot and advances `start`; the query scores every slot with one product per K/V group (the softmax is
indifferent to the slots' order). No window shift, no concatenation, no repeated K/V.

The ring serves once every sink slot is filled (before that a leaving key may become a sink: `leave_window`, the
general path). `ring_from_parts` / `ring_to_parts` convert to and from the in-order window and sinks that everything
else reads (`HybridState`); the numbers are those of `sliding_window_linear_attention` (tests/test_ops/test_hybrid_ring.py).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from .feature_maps import get_feature_map
from .hybrid_chunked import _EPS, SinkKV, _gamma, _linear_scale, check_hybrid_options
from .linear import state_updatable_in_place

_FLOAT32_MIN = torch.finfo(torch.float32).min


class HybridRing(NamedTuple):
    """The hybrid's softmax slots in one buffer: keys `[B, Hkv, S + W, D]`, values `[B, Hkv, S + W, Dv]`, mask
    `[B, S + W]` (False: an empty slot); the first `sinks` slots are the sinks, the other W the window in ring order,
    its oldest key at `sinks + start`."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    sinks: int
    start: int

    @property
    def window(self) -> int:
        return self.keys.shape[2] - self.sinks


def ring_from_parts(window_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sink_kv: SinkKV | None) -> HybridRing:
    """The ring (new tensors) of an in-order window (keys `[B, Hkv, W, D]`, values, mask `[B, W]`, oldest first)
    and sink slots (None: no sinks), which must all be filled (a leaving key could still become a sink otherwise)."""
    wk, wv, wmask = window_kv
    if sink_kv is None:  # copies, as with sinks: the ring's steps never write into tensors a caller still holds
        return HybridRing(wk.clone(memory_format=torch.contiguous_format), wv.clone(memory_format=torch.contiguous_format),
                          wmask.to(torch.bool, copy=True), 0, 0)
    sk, sv, smask = sink_kv
    if not bool(smask.all()):
        raise ValueError("the hybrid ring serves once every sink slot is filled; some are still empty")
    return HybridRing(
        torch.cat([sk, wk], dim=2), torch.cat([sv, wv], dim=2), torch.cat([smask, wmask], dim=1).to(torch.bool),
        sk.shape[2], 0,
    )


def ring_to_parts(ring: HybridRing) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], SinkKV | None]:
    """(the in-order window, the sink slots or None) of `ring` (new tensors for the window when `start` is not 0)."""
    s, start = ring.sinks, ring.start
    keys, values, mask = ring.keys[:, :, s:], ring.values[:, :, s:], ring.mask[:, s:]
    if start:  # the oldest slot first
        keys, values, mask = keys.roll(-start, dims=2), values.roll(-start, dims=2), mask.roll(-start, dims=1)
    sinks = None if not s else (ring.keys[:, :, :s], ring.values[:, :, :s], ring.mask[:, :s])
    return (keys, values, mask), sinks


# id(window factor) -> (a weak reference to it, (its version, linear_weight, device), (gamma, lambda))
_MIXES: dict[int, tuple] = {}


def _mix(window_factor: torch.Tensor | None, h: int, device, linear_weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, lambda) `[1, H, 1]`, the window's and the linear part's weights per head: kept per window-factor tensor
    while its version (bumped by every in-place change: an optimizer step, `load_state_dict`) stays the same, since
    a decoding step would otherwise spend 5 of its ~50 operations recomputing them."""
    if window_factor is None:
        gamma = _gamma(None, h, device).view(1, h, 1)
        return gamma, _linear_scale(gamma, linear_weight)
    key = (window_factor._version, linear_weight, device)
    held = _MIXES.get(id(window_factor))
    if held is not None and held[0]() is window_factor and held[1] == key:
        return held[2]
    gamma = _gamma(window_factor.detach(), h, device).view(1, h, 1)
    mix = gamma, _linear_scale(gamma, linear_weight)
    if len(_MIXES) > 4096:  # entries of freed tensors: start again
        _MIXES.clear()
    _MIXES[id(window_factor)] = (weakref.ref(window_factor), key, mix)
    return mix


def ring_updatable_in_place(ring: HybridRing, state: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether `hybrid_ring_step_` can update `ring` and the linear `state` in place: contiguous float32 tensors
    (the state as `linear.state_updatable_in_place` asks of the linear step's)."""
    slots_ok = all(x.dtype == torch.float32 and x.is_contiguous() for x in (ring.keys, ring.values))
    return slots_ok and ring.mask.is_contiguous() and state_updatable_in_place(state)


def hybrid_ring_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    ring: HybridRing,
    state: tuple[torch.Tensor, torch.Tensor],
    *,
    feature_map: str | nn.Module,
    window_factor: torch.Tensor | None = None,
    scaling: float | None = None,
    key_feature_map: str | nn.Module | None = None,
    linear_weight: str = "1-gamma",
) -> tuple[torch.Tensor, HybridRing]:
    """One decoding step of the hybrid for a single new token, `ring` and `state` updated in place: the numbers of
    `hybrid_decode_step` with its sinks all filled.

    Args:
        q: `[B, H, 1, D]`. k, v: `[B, Hkv, 1, D]` / `[B, Hkv, 1, Dv]`, the new token's. mask: `[B, 1]` bool.
        ring: the sinks and window (`HybridRing`, contiguous float32: `ring_updatable_in_place`).
        state: (S `[B, H, F, Dv]`, z `[B, H, F]`) of the keys before the window, sinks excepted; contiguous float32.
        feature_map, window_factor, scaling, key_feature_map, linear_weight: as in `sliding_window_linear_attention`.

    Returns:
        (output `[B, H, 1, Dv]` in v's dtype, the ring with `start` advanced).
    """
    b, h, nq, d = q.shape
    hkv, slots = ring.keys.shape[1], ring.keys.shape[2]
    if nq != 1 or k.shape[2] != 1:
        raise ValueError(f"hybrid_ring_step_ takes one new token, got {nq} queries and {k.shape[2]} keys")
    if ring.keys.shape[:2] != k.shape[:2] or ring.mask.shape != (b, slots) or h % hkv:
        raise ValueError(
            f"the ring (keys {tuple(ring.keys.shape)}, mask {tuple(ring.mask.shape)}) does not match the new key "
            f"{tuple(k.shape)} and query {tuple(q.shape)} in batch or heads"
        )
    if not ring_updatable_in_place(ring, state):
        raise ValueError("hybrid_ring_step_ updates contiguous float32 ring and state tensors in place")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *state)):
        raise ValueError("hybrid_ring_step_ updates its tensors in place and takes no autograd; use hybrid_decode_step")
    check_hybrid_options(ring.window, ring.sinks, linear_weight)
    g, dv = h // hkv, ring.values.shape[-1]
    s, z = state
    f = s.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    phi_q = get_feature_map(feature_map)
    phi_k = phi_q if key_feature_map is None else get_feature_map(key_feature_map)
    slot = ring.sinks + ring.start

    # the oldest window key leaves: folded into the linear state (an empty slot's mask zeroes it)
    # (narrow / select rather than subscripts: a step is a few hundred us, a subscript a few us each)
    k_old, v_old = ring.keys.narrow(2, slot, 1), ring.values.narrow(2, slot, 1)
    if getattr(phi_k, "per_head", False):
        kf = phi_k(k_old.expand(b, hkv, g, d).reshape(b, h, 1, d)).reshape(b, hkv, g, f)
    else:  # one map for every head: the group's query heads share the leaving key's features (broadcast, no copy)
        kf = phi_k(k_old).reshape(b, hkv, 1, f)
    kf = kf * ring.mask.select(1, slot).view(b, 1, 1, 1)
    s.view(b, hkv, g, f, dv).addcmul_(kf.unsqueeze(-1), v_old.view(b, hkv, 1, 1, dv))
    z.view(b, hkv, g, f).add_(kf)
    # the new token takes its slot
    ring.keys.select(2, slot).copy_(k.select(2, 0))
    ring.values.select(2, slot).copy_(v.select(2, 0))
    ring.mask.select(1, slot).copy_(mask.select(1, 0))

    # softmax over the sinks and the window (one product per K/V group), linear attention over the state
    qf = q.float()
    scores = torch.bmm((qf * scaling).view(b * hkv, g, d), ring.keys.view(b * hkv, slots, d).transpose(1, 2))
    scores = scores.view(b, h, slots).masked_fill_(ring.mask.logical_not().unsqueeze(1), float("-inf"))
    top = scores.amax(-1, keepdim=True).clamp_min_(_FLOAT32_MIN)  # all masked: weights 0
    gamma, lam = _mix(window_factor, h, q.device, linear_weight)
    soft = scores.sub_(top).exp_().mul_(gamma)
    num = torch.bmm(soft.view(b * hkv, g, slots), ring.values.view(b * hkv, slots, dv)).view(b * h, 1, dv)
    den = soft.sum(-1).view(b * h, 1, 1)
    fq = phi_q(qf).reshape(b, h, f) * lam
    fq = fq.view(b * h, 1, f)
    num = num.baddbmm_(fq, s.view(b * h, f, dv))
    den = den.baddbmm_(fq, z.view(b * h, f, 1))
    out = num.div_(den.clamp_min_(_EPS)).view(b, h, 1, dv).to(v.dtype)
    return out, ring._replace(start=(ring.start + 1) % ring.window)
