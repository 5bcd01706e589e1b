"""Making a forward over a few tokens cost about what a forward over one token costs, on a CPU.

Speculative decoding pays off only if verifying k guesses costs little more than one greedy step. On a CPU with a
small model, one token is memory-bound (every weight read once per forward), so a handful of tokens could ride
along almost for free; measured on SmolLM2-135M (fp32, 1 thread, 256 cached tokens) they did not: 2 tokens cost
about +60% over 1. Profiling found two avoidable costs, both outside the model's arithmetic:

* **Linear layers.** `F.linear(x, W)` with 2..~12 rows runs MKL's GEMM, which packs the transposed weight `W^T`
  into its panel layout on every call: an extra read and write of every weight, which is most of a memory-bound
  forward. `torch.mm(W, x^T)^T` computes the same product with the small activation as the packed operand, and
  costs about what the one-row GEMV costs (2 rows: 41 ms instead of 57 ms over the model's projections; 4 rows:
  45 instead of 68). With more rows GEMM's blocking wins again (from ~6 rows on 1 thread, ~12 on 2), so the
  rewrite is limited to `max_rows` rows.
* **Grouped-query attention with a mask.** transformers' sdpa path uses `enable_gqa` only when there is no mask,
  and for one query token packs the query heads onto the K/V heads; a speculative forward has several query tokens
  and a mask, so it falls back to `repeat_kv`, which copies the whole K/V cache of every layer (3x for SmolLM2's 9
  query / 3 K/V heads) on every forward: a cost that grows with the context. `gqa_sdpa_attention` generalizes the
  one-token packing: the `n_rep` query heads that share a K/V head become `n_rep * q` query rows of that head, the
  mask is repeated along rows, and nothing of the cache is copied.

`fast_verification(model)` applies both for the duration of a decoding call and undoes them afterwards. The
results are the same products summed in another order: equal to the plain forward up to float rounding (the
exactness tests run in float64, where any difference is ~1e-15).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

ATTENTION_NAME = "hf_fastattn_gqa_sdpa"  # registered with transformers while a decoding call uses it
_registered = False


def small_rows_linear(module: nn.Linear, x: torch.Tensor, max_rows: int, pad_rows: dict | None = None) -> torch.Tensor:
    """`module(x)`, as `(W @ x^T)^T` when `x` has 2..`max_rows` rows on a CPU (see the module docstring).

    `pad_rows` maps a row count to a larger one computed instead (the extra rows repeat the last one and are
    dropped): on 1 thread MKL multiplies by 3 columns more slowly than by 4."""
    weight = module.weight
    rows = x.numel() // weight.shape[1] if x.numel() else 0
    if not 2 <= rows <= max_rows or x.device.type != "cpu" or x.dtype != weight.dtype:
        return nn.functional.linear(x, weight, module.bias)
    # the rows must be contiguous (the transposed view is then the column-major operand MKL takes without a copy;
    # a row-major [in, rows] operand is 3x slower) and so must the result (the next layer's input)
    rows_in = x.reshape(rows, weight.shape[1]).contiguous()
    padded = (pad_rows or {}).get(rows, rows)
    if padded > rows:
        rows_in = torch.cat([rows_in, rows_in[-1:].expand(padded - rows, -1)])
    out = torch.mm(weight, rows_in.t()).t()[:rows].contiguous()
    if module.bias is not None:
        out = out + module.bias
    return out.view(*x.shape[:-1], weight.shape[0])


def gqa_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' sdpa attention, without copying the K/V cache for grouped-query attention with a mask.

    Args:
        module: the attention module (`num_key_value_groups` is read).
        query (`torch.Tensor` `[B, H, q, D]`), key, value (`[B, Hkv, kv, D]`): after RoPE and the cache update.
        attention_mask (`torch.Tensor` `[B or 1, 1, q, kv]`, *optional*): additive float or boolean mask.

    Returns:
        `(out [B, q, H, D], None)`, as `sdpa_attention_forward`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    q_len = query.shape[2]
    if (
        groups == 1
        or q_len == 1  # transformers packs one query token itself
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or (dropout and module.training)
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # heads h * groups .. h * groups + groups - 1 share K/V head h (transformers' repeat_kv order)
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    mask = attention_mask.repeat(1, 1, groups, 1)  # row r * q_len + i of the packed query is query row i
    out = nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


@contextlib.contextmanager
def fast_verification(model, max_rows: int | None = None, enabled: bool = True):
    """Within the block, `model`'s forwards over a few tokens take the fast paths of the module docstring.

    Applied only where they are the same computation: plain `nn.Linear` layers (not already wrapped by hooks that
    replace `forward`), and the attention swap only for models running transformers' "sdpa" implementation.
    Everything is restored on exit, also after an exception.

    Args:
        model: a `PreTrainedModel`.
        max_rows (`int`, *optional*): linear layers take `(W @ x^T)^T` for 2..`max_rows` rows (batch x tokens).
            Default: 5 on 1 thread, else 4 per torch thread, at most 12 (SmolLM2-135M, 256 cached tokens, whole
            forward: 1 thread, 2 / 4 / 8 tokens 75 / 81 / 124 ms against 94 / 100 / 112 with `F.linear`, one token
            60; 2 threads, 2 / 4 / 8 tokens 52 / 56 / 77 ms against 93 / 97 / 92, one token 57). On 1 thread 3 rows
            are computed as 4 (a busy machine, 450 cached tokens, best of 6 interleaved: 3 tokens 105 -> 94 ms, 4
            tokens 90-94) and 5 rows take this path too (125 -> 107-110 ms; 6 rows gain nothing: 125-127).
        enabled (`bool`): False makes this a no-op (for comparisons).
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    if max_rows is None:
        max_rows = 5 if threads == 1 else min(4 * threads, 12)
    pad_rows = {3: 4} if threads == 1 else None
    patched = []
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__ and module.weight.device.type == "cpu":
            module.forward = _bound(module, max_rows, pad_rows)
            patched.append(module)
    configs = []
    if model.config._attn_implementation == "sdpa":
        _register()
        for config in _configs(model.config):
            if getattr(config, "_attn_implementation_internal", None) == "sdpa":
                config._attn_implementation_internal = ATTENTION_NAME
                configs.append(config)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        for config in configs:
            config._attn_implementation_internal = "sdpa"


def _bound(module, max_rows, pad_rows):
    def forward(x):
        return small_rows_linear(module, x, max_rows, pad_rows)

    return forward


def _configs(config):
    """`config` and its sub-configs (a text config inside a multimodal one)."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation_internal"):
            yield sub
