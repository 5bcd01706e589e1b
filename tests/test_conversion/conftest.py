"""Shared fixtures: tiny models of each family and a tiny tokenizer trained on a slice of tinyshakespeare."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hf_fastattn  # noqa: E402,F401
import hf_fastattn.conversion  # noqa: E402,F401


def corpus_text(chars: int = 60_000) -> str:
    """The first `chars` characters of the corpus packaged with hf_fastattn (tinyshakespeare)."""
    from hf_fastattn.showcase.tinylm import load_corpus

    return load_corpus()[:chars]


@pytest.fixture(scope="session")
def text() -> str:
    return corpus_text()


@pytest.fixture(scope="session")
def tokenizer(text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, **overrides):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    elif family == "bert":
        cfg = BertConfig(**common, max_position_embeddings=256)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[
            family
        ]
        cfg = cls(**common, num_key_value_heads=4, max_position_embeddings=256, head_dim=16)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_ids(seed: int = 0, batch: int = 2, n: int = 24) -> torch.Tensor:
    """`[batch, n]` token ids in the tiny models' vocabulary (3..299: no special tokens), from a fixed seed."""
    return torch.randint(3, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    return auto.from_config(cfg).eval()
