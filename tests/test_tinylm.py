"""The small-model recipe: packaged corpus, tokenizer, exact perplexity, training, the cached teacher."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_fastattn.showcase import tinylm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text():
    return tinylm.load_corpus()


@pytest.fixture(scope="module")
def tokenizer(text):
    return tinylm.train_tokenizer(text[:100_000], vocab_size=300)


def test_packaged_corpus(text):
    assert tinylm.CORPUS_PATH.stat().st_size <= 1_000_000
    assert text.startswith("First Citizen:")
    train, val = tinylm.split_corpus(text)
    assert train + val == text and train.endswith("\n")
    assert 0.09 < len(val) / len(text) < 0.11
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tinylm.load_corpus("/no/such/file.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        tinylm.split_corpus(text, 1.5)


def test_tokenizer_round_trip(text, tokenizer):
    sample = text[200_000:201_000]
    assert tokenizer.decode(tokenizer(sample, add_special_tokens=False)["input_ids"]) == sample
    assert tokenizer.pad_token is not None and len(tokenizer) == 300


def test_perplexity_is_exact(tokenizer, text):
    """Against an independent recomputation: token by token over the same non-overlapping windows."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(
        tinylm.tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    ).eval()
    sample = text[5000:7000]
    got = tinylm.perplexity(model, tokenizer, sample, seq_len=64, batch_size=3)
    ids = torch.tensor(tokenizer(sample, add_special_tokens=False)["input_ids"])
    nll, count = 0.0, 0
    for start in range(0, len(ids), 64):
        window = ids[start : start + 64]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_training_lowers_the_loss(tmp_path, text, grad_mode):
    """Also when called under no_grad, as the benchmarks' entry points run (the teacher is trained on first use)."""
    with grad_mode():
        model, tok = _train_small(tmp_path, text)
    _, val = tinylm.split_corpus(text[:60_000])
    fresh = type(model)(model.config).eval()
    assert tinylm.perplexity(model, tok, val, seq_len=32) < 0.7 * tinylm.perplexity(
        fresh, tok, val, seq_len=32
    )
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert model.config.tinylm_train_tokens == 25 * 8 * 32


def _train_small(tmp_path, text):
    return tinylm.train_tiny_llama(
        tmp_path,
        text=text[:60_000],
        steps=25,
        seq_len=32,
        batch_size=8,
        vocab_size=280,
        lr=1e-2,
        warmup=3,
        config_overrides=dict(hidden_size=32, num_layers=1, num_heads=2),
        progress=False,
    )


def test_get_tiny_llama_caches(tmp_path, monkeypatch):
    calls = []
    real = tinylm.train_tiny_llama

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tinylm, "train_tiny_llama", counting)
    kwargs = dict(
        steps=2,
        seq_len=16,
        batch_size=2,
        config_overrides=dict(hidden_size=16, num_layers=1, num_heads=2),
        progress=False,
    )
    a, _ = tinylm.get_tiny_llama(tmp_path, **kwargs)
    # the same model: the progress bar is not part of the key, and a default spelled out is the default
    b, _ = tinylm.get_tiny_llama(tmp_path, **(kwargs | {"progress": True, "lr": 3e-3}))
    assert len(calls) == 1
    # a different number of steps is a different model
    tinylm.get_tiny_llama(tmp_path, **(kwargs | {"steps": 3}))
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_lm_dataset_blocks(tokenizer, text):
    ds = tinylm.lm_dataset(text[:20_000], tokenizer, seq_len=50)
    assert len(ds) > 10 and all(len(row) == 50 for row in ds["input_ids"][:5])
    assert ds["labels"][0] == ds["input_ids"][0]


def test_example_script_runs_tiny(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_tiny_llama.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation perplexity" in result.stdout
