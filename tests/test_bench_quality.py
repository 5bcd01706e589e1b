"""`hf-fastattn bench quality` on a tiny saved Llama (the real model's run is the README table): every variant is
scored on the same tokens, sdpa's row is the reference, and a covering sparse pattern scores exactly sdpa's."""

import json

import torch

from hf_fastattn.conversion.distill import perplexity_of_ids
from hf_fastattn.conversion.tiny import tiny_llama, tiny_tokenizer
from hf_fastattn.showcase.bench import quality
from hf_fastattn.showcase.tinylm import load_corpus


def test_bench_quality_on_a_local_model(tmp_path):
    text = load_corpus()[:20000]
    tokenizer = tiny_tokenizer(text, vocab_size=256)
    model = tiny_llama(len(tokenizer), heads=4)  # 4 K/V heads
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert quality.main(["--model", str(tmp_path / "model"), "--tokens", "256", "--lengths", "64", "128",
                         "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "quality.json").read_text())
    rows = {(r["variant"], r["length"]): r for r in data["rows"]}
    names = {"sdpa", "sparse-strided", "sparse-fixed", "mqa", "gqa-2", "linear (untrained)", "fast (untrained)"}
    assert {name for name, _ in rows} == names  # 4 K/V heads: groups 1 (mqa) and 2
    ids = quality.held_out_ids(tokenizer, None, 256)
    with torch.no_grad():
        expected = perplexity_of_ids(model.eval(), ids, 64)
    assert abs(rows["sdpa", 64]["ppl"] - expected) < 1e-6 * expected and rows["sdpa", 64]["x_sdpa"] == 1.0
    for pattern in ("sparse-strided", "sparse-fixed"):  # default stride 128 covers windows of 64 and 128 tokens
        for length in (64, 128):
            assert abs(rows[pattern, length]["x_sdpa"] - 1) < 1e-4
    for swapped in ("mqa", "linear (untrained)", "fast (untrained)"):  # the swap took effect (random weights:
        assert abs(rows[swapped, 128]["x_sdpa"] - 1) > 1e-5, swapped  # near-uniform text, so only a small change)
    assert "x sdpa @128" in (out / "quality.md").read_text()
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
