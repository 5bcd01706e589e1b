"""A small softmax Llama trained on the packaged tinyshakespeare: the teacher for conversion, the model for the
decoding benchmarks and the demo. Everything runs offline on a CPU in minutes.

    model, tokenizer = get_tiny_llama()          # trains once (a few minutes), then loads from the cache
    train, val = split_corpus(load_corpus())
    perplexity(model, tokenizer, val)

The tokenizer is a byte-level BPE trained on the corpus, the model a `LlamaForCausalLM`; both are saved with
`save_pretrained` (safetensors), so they load with the ordinary transformers calls.

Also the untrained offline stand-ins of the examples' `--tiny` mode and the smoke tests (formerly
`hf_fastattn.conversion.tiny`, which re-exports them for one release): `tiny_tokenizer(text)`, `tiny_llama(vocab)`
and `corpus(chars)`. This module belongs to the showcase: the library core (ops, kernels, integration, conversion,
generation) never imports it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..conversion.data import lm_dataset, perplexity, split_text

CORPUS_PATH = Path(__file__).parents[1] / "data" / "tinyshakespeare.txt"

__all__ = [
    "corpus",
    "get_tiny_llama",
    "load_corpus",
    "lm_dataset",
    "perplexity",
    "split_corpus",
    "tiny_llama",
    "tiny_llama_config",
    "tiny_tokenizer",
    "train_tiny_llama",
    "train_tokenizer",
]


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """The text of `path`, or of the packaged tinyshakespeare (1 MB) when None."""
    path = Path(path) if path is not None else CORPUS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")


def corpus(chars: int | None = None) -> str:
    """The packaged tinyshakespeare (`load_corpus()`), its first `chars` characters when given."""
    text = load_corpus()
    return text if chars is None else text[:chars]


def split_corpus(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation), the last `val_fraction` held out, cut at a line boundary."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    train, _ = split_text(text, val_fraction)
    cut = train.rfind("\n") + 1 or len(train)
    return text[:cut], text[cut:]


def tiny_tokenizer(text: str, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `text` (deterministic), with <unk>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def train_tokenizer(text: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `text`, with <s> / </s> and a pad token (the EOS token) so batches can be padded."""
    tokenizer = tiny_tokenizer(text, vocab_size=vocab_size)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """A randomly initialized small `LlamaForCausalLM` (seeded: identical in every process), for the examples'
    `--tiny` mode and smoke tests (no training, no download)."""
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


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    **overrides,
) -> LlamaConfig:
    """A small Llama config; `overrides` go to `LlamaConfig` as they are."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size + hidden_size // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        **overrides,
    )


def train_tiny_llama(
    out_dir: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    steps: int = 500,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup: int = 30,
    seed: int = 0,
    vocab_size: int = 512,
    config_overrides: dict | None = None,
    progress: bool = True,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Train a small softmax Llama from scratch on the training split of `text` (default: the packaged corpus).

    A plain loop: AdamW, linear warm-up then cosine decay, random `seq_len` blocks. Saves model and tokenizer with
    `save_pretrained` when `out_dir` is given. Returns the model in eval mode; `config.tinylm_train_tokens` records
    the tokens it was trained on (conversion budgets are a fraction of it), `config.max_position_embeddings` the
    length it was trained at (RoPE runs longer; the conversion recipes train at the model's context).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    train_text, _ = split_corpus(text if text is not None else load_corpus())
    tokenizer = train_tokenizer(train_text, vocab_size=vocab_size)
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    if len(ids) <= seq_len:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than seq_len={seq_len} + 1")
    # its context is what it was trained on: max_position_embeddings = seq_len (conversion recipes read it)
    config = tiny_llama_config(len(tokenizer), **{"max_position_embeddings": seq_len, **(config_overrides or {})})
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training tiny Llama", disable=not progress)
    with torch.enable_grad():  # also when called under no_grad (the benchmarks' entry points are)
        for _ in bar:
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
            batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.config.tinylm_train_tokens = steps * batch_size * seq_len
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


_TRAIN_SIGNATURE = inspect.signature(train_tiny_llama)


def get_tiny_llama(cache_dir: str | os.PathLike | None = None, **train_kwargs):
    """`train_tiny_llama(**train_kwargs)` once, cached on disk under `$HF_FASTATTN_CACHE` (default
    `~/.cache/hf_fastattn`) by a hash of the arguments; later calls load the saved model and tokenizer."""
    if "text" in train_kwargs:
        raise ValueError(
            "get_tiny_llama trains on the packaged corpus; call train_tiny_llama(text=...) for others"
        )
    # the key: every argument that shapes the model, defaults filled in (a changed default is a new model)
    bound = _TRAIN_SIGNATURE.bind(**train_kwargs)
    bound.apply_defaults()
    shaping = {k: v for k, v in bound.arguments.items() if k not in ("out_dir", "progress")}
    key = hashlib.sha1(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("HF_FASTATTN_CACHE", Path.home() / ".cache" / "hf_fastattn"))
    path = root / f"tiny_llama-{key}"
    if not (path / "config.json").is_file():
        train_tiny_llama(path, **train_kwargs)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)
