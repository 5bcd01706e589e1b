"""`hf-fastattn convert`: runs end to end on a tiny model, never touches SRC, clear errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_fastattn.cli import main as cli_main


def _hashes(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def src(tmp_path, tokenizer):
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def train_file(tmp_path, text):
    path = tmp_path / "train.txt"
    path.write_text(text[:20_000])
    return path


@pytest.mark.parametrize("method", ["hedgehog", "t2r"])
def test_convert_cli_end_to_end(tmp_path, src, train_file, capsys, method):
    before = _hashes(src)
    out = tmp_path / "out"
    argv = [
        "convert",
        str(src),
        "--method",
        method,
        "--hybrid",
        "--window",
        "16",
        "--train-file",
        str(train_file),
    ]
    argv += [
        "--max-steps",
        "2",
        "--transfer-steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity before" in printed and f"after conversion ({method})" in printed
    assert _hashes(src) == before
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "HfFastattnLlamaForCausalLM"
    assert model.config.fastattn == {"feature_map": "elu", "window": 16}
    assert model.config.fastattn_conversion["method"] == method and model.config.fastattn_conversion["hybrid"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "performer"], "valid methods are"),
        (["--method", "mqa", "--hybrid"], "do not apply to method 'mqa'"),
        (["--method", "gqa", "--num-key-value-heads", "3"], "must divide"),
        (["--method", "t2r", "--feature-dim", "0"], "feature_dim"),
        (["--method", "t2r", "--hybrid", "--score-weight", "1"], "not with --hybrid"),
        (["--method", "mqa", "--score-weight", "1"], "do not apply to method 'mqa'"),
        (["--method", "t2r", "--transfer-steps", "1", "--score-weight", "-1"], "transfer_score_weight"),
    ],
    ids=["method", "option", "gqa-groups", "feature-dim", "score-hybrid", "score-mqa", "score-negative"],
)
def test_convert_cli_errors(tmp_path, src, train_file, capsys, extra, message):
    before = _hashes(src)
    argv = [
        "convert",
        str(src),
        *extra,
        "--train-file",
        str(train_file),
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert _hashes(src) == before


def test_convert_cli_bad_paths(tmp_path, src, train_file, capsys):
    common = ["--method", "linear", "--max-steps", "1", "--out", str(tmp_path / "o")]
    assert cli_main(["convert", str(tmp_path / "missing"), "--train-file", str(train_file), *common]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli_main(["convert", str(src), "--train-file", str(tmp_path / "nope.txt"), *common]) == 2
    assert "cannot load text" in capsys.readouterr().err
    assert (
        cli_main(
            ["convert", str(src), "--train-file", str(train_file), "--method", "linear", "--out", str(src)]
        )
        == 2
    )
    assert "--out must differ from SRC" in capsys.readouterr().err


def test_convert_cli_score_weight_reaches_attention_transfer(tmp_path, src, train_file, monkeypatch):
    """--score-weight adds Hedgehog's attention-score loss to pure t2r's attention transfer (each layer, each step)."""
    import hf_fastattn.conversion.distill as distill

    calls = []
    real = distill.attention_score_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "attention_score_loss", spy)
    argv = ["convert", str(src), "--method", "t2r", "--train-file", str(train_file), "--transfer-steps", "2",
            "--score-weight", "0.5", "--max-steps", "0", "--seq-len", "32", "--batch-size", "2",
            "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    assert len(calls) == 2 * 2  # 2 steps x 2 layers
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.fastattn_conversion["method"] == "t2r"
