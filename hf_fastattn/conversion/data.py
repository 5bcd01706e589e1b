"""Data helpers of uptraining: `load_text` (a local text file or a `datasets` name), `split_text` (held-out tail),
`lm_dataset` (fixed-length blocks) and `perplexity` / `perplexity_of_ids` (exact, over every held-out token).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn


def load_text(path_or_name: str, split: str = "train", text_column: str = "text") -> str:
    """The text of a local file, or of a `datasets` dataset (name or local dataset directory), joined by newlines."""
    import datasets

    if os.path.isfile(path_or_name):
        with open(path_or_name, encoding="utf-8") as f:
            return f.read()
    try:
        ds = datasets.load_dataset(path_or_name, split=split)
    except Exception as e:  # datasets raises many types for a bad name / no network
        raise ValueError(
            f"cannot load text from {path_or_name!r}: not a file, and datasets failed: {e}"
        ) from e
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset {path_or_name!r} has no column {text_column!r}; columns: {ds.column_names}"
        )
    return "\n".join(ds[text_column])


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation): the last `val_fraction` of the text is held out."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def lm_dataset(text: str, tokenizer, seq_len: int, max_blocks: int | None = None):
    """`datasets.Dataset` of consecutive `seq_len`-token blocks (input_ids, attention_mask, labels)."""
    import datasets

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * seq_len] * n, "labels": [list(b) for b in blocks]}
    )


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8) -> float:
    """Exact perplexity of a causal LM on `text`: every token after the first of each non-overlapping
    `seq_len` window is scored (the tail shorter than a window included); exp(total NLL / tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return perplexity_of_ids(model, ids, seq_len, batch_size)


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """`perplexity` on token ids `[T]` already made."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    full = [w for w in windows if len(w) == seq_len]
    rest = [w for w in windows if len(w) != seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in rest]
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / max(count, 1))
