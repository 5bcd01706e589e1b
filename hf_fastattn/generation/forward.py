"""The model forward of one pass (step 2 of the loop in `jacobi.py`): `Forward` calls the model with the cache and
returns the last positions' logits; `guess_mask` is the additive 4D mask of committed tokens and a guess tree;
`timed_forward` is a dummy pass of a given size, taken back out of the cache, for `speculation.ForwardCost`."""

from __future__ import annotations

import torch

from ..integration.cache import cache_argument
from .rollback import rollback


class Forward:
    """One model forward with the cache; returns the fp32 logits of the last `num_logits` positions `[B, n, V]`."""

    def __init__(self, model, cache, extra_kwargs):
        self.model = model
        self.kwargs = dict(extra_kwargs, use_cache=True, return_dict=True)
        self.kwargs[cache_argument(model)] = cache  # looked up once: inspecting the signature costs ~0.1 ms
        self.keep_logits = model._supports_logits_to_keep() if hasattr(model, "_supports_logits_to_keep") else False
        self.prepare = None  # called with the tokens per row before each forward (`fastpath.FastPath.prepare`)

    def __call__(self, tokens, positions, mask, num_logits: int) -> torch.Tensor:
        keep = {"logits_to_keep": num_logits} if self.keep_logits else {}
        if self.prepare is not None:
            self.prepare(tokens.shape[1])
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, **keep, **self.kwargs)
        return out.logits[:, -num_logits:].float()


def guess_mask(padding, cached: int, length: int, q: int, ancestors, batch: int, dtype, device) -> torch.Tensor:
    """The additive 4D attention mask `[B, 1, u + q, length + q]` of a forward over the u = length - cached uncached
    committed tokens and q guesses: committed tokens attend causally; a guess attends to every committed token and
    to its ancestors (`ancestors` `[B, q, q]`; None for a chain: the guesses before it). `padding` `[B, >= length]`
    is the padding mask (None: no padding). Building it here skips transformers' mask construction (~0.1 ms)."""
    blocked = torch.finfo(dtype).min
    u = length - cached
    additive = torch.zeros(batch, 1, u + q, length + q, dtype=dtype, device=device)
    additive[:, :, :, cached:] = torch.full((u + q, u + q), blocked, dtype=dtype, device=device).triu_(1)  # causal
    if ancestors is not None:
        tree = torch.zeros(ancestors.shape, dtype=dtype, device=device).masked_fill_(~ancestors, blocked)
        additive[:, 0, u:, length:] = tree
    if padding is not None:
        additive[:, :, :, :length].masked_fill_(~padding[:, None, None, :length].bool(), blocked)
    return additive


def timed_forward(forward, cache, ids, positions, mask, length, k, trees, dtype) -> None:
    """A forward over the last committed token and k - 1 dummy guesses (a chain), then taken back out of the cache:
    the shape of a real pass, for `ForwardCost.calibrate`."""
    batch = ids.shape[0]
    fed = ids[:, length - 1 : length].expand(-1, k)
    fed_positions = positions[:, length - 1 : length] + torch.arange(k, device=ids.device)
    if trees and k > 1:
        fed_mask = guess_mask(mask, length - 1, length, k - 1, None, batch, dtype, ids.device)
    else:
        fed_mask = None if mask is None else torch.cat([mask[:, :length], mask.new_ones(batch, k - 1)], -1)
    forward(fed, fed_positions, fed_mask, 1)
    rollback(cache, k)
