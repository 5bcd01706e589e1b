"""Tiny models for the generation tests (a helper module, not a conftest: tests/test_conversion has one)."""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96
PAD, BOS = 0, 1


@functools.cache
def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer Llama in float64.

    float64 makes the exactness tests honest: a block forward and a one-token forward compute the same logits up to
    ~1e-15, so their argmax can only differ on an exact tie, which random weights do not produce. The wide init
    (0.5) makes the logits peaky, so the text is not uniform noise.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=PAD,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).double().eval()


@functools.cache
def tiny_qwen3_next():
    """A random 2-layer Qwen3-Next (one gated-delta-net layer with a recurrent state, one attention layer), float64.

    Its cache has a `LinearAttentionLayer`, which cannot be cropped: the Jacobi loop must snapshot and restore it.
    """
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
        initializer_range=0.5,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    model = Qwen3NextForCausalLM(config)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel on CPU
    return model.double().eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[B, max_len]` with PAD on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def damped(model, factor: float = 0.02):
    """A copy of `model` whose attention/MLP outputs are scaled by `factor`: nearly a bigram model.

    Its greedy text soon repeats a cycle, like a trained small LM does, so n-gram guesses get accepted and the
    acceptance paths (several tokens per forward, cache kept or restored) are exercised. Context still matters a
    little, so a wrong cache would still change the output.
    """
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("o_proj", "out_proj", "down_proj")):
                param.mul_(factor)
    return model


@functools.cache
def tiny_bigram_llama():
    return damped(tiny_llama(), 0.005)


@functools.cache
def tiny_llama_eager(bigram: bool = False):
    """`tiny_llama` (or its near-bigram copy) with eager attention: our 4D masks are then added to the scores."""
    import copy

    model = copy.deepcopy(tiny_bigram_llama() if bigram else tiny_llama())
    model.set_attn_implementation("eager")
    return model


@functools.cache
def tiny_bigram_qwen3_next():
    return damped(tiny_qwen3_next())
