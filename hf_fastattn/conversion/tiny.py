"""Tiny offline stand-ins for the examples' `--tiny` mode and the smoke tests: a byte-level BPE tokenizer trained
on a few kB of text and a randomly initialized 2-layer Llama (no downloads)."""

from __future__ import annotations

import torch


def tiny_tokenizer(text: str, vocab_size: int = 256):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `text` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """A randomly initialized small `LlamaForCausalLM` (seeded: identical in every process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def corpus(chars: int | None = None) -> str:
    """tinyshakespeare from the shared data folder (or tinylm's loader when present), first `chars` characters."""
    try:
        from ..tinylm import load_corpus
    except ImportError:
        load_corpus = None
    if load_corpus is not None:
        text = load_corpus()
    else:
        import pathlib

        candidates = [pathlib.Path(__file__).resolve().parents[3] / "shared/data/tinyshakespeare.txt"]
        candidates.append(pathlib.Path("/work/shared/data/tinyshakespeare.txt"))
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                "tinyshakespeare.txt not found (expected ../shared/data/tinyshakespeare.txt)"
            )
        text = path.read_text(encoding="utf-8")
    return text if chars is None else text[:chars]
