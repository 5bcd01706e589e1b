"""DDGviz pictures, the `generate` / `ddgviz` / `bench jacobi` commands and the examples, on tiny offline models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gen_helpers import tiny_bigram_llama

from hf_fastattn.cli import main as cli_main
from hf_fastattn.generation import ddgviz
from hf_fastattn.generation.ddgviz import trace_grid
from hf_fastattn.showcase.bench.jacobi import HEADER, _kind_rows

ROOT = Path(__file__).resolve().parents[2]


class _CharTokenizer:
    """Token i <-> chr(65 + i): enough of a tokenizer for ddgviz."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, return_tensors=None):
        class _Out:
            input_ids = torch.tensor([[ord(c) - 65 for c in text]])

        return _Out()

    def decode(self, tokens):
        return "".join(chr(65 + t) for t in tokens)


def test_ddgviz_grid_and_files(tmp_path):
    model, tokenizer = tiny_bigram_llama(), _CharTokenizer()
    grid = trace_grid(
        model, tokenizer, "DEFGH", max_new_tokens=12, mode="jacobi", block_size=None, adaptive=False
    )
    greedy = model.generate(tokenizer("DEFGH").input_ids, max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert grid["final"] == greedy
    # every pass commits at least one new position; the last row shows the whole output verified
    assert 1 <= len(grid["cells"]) <= 12
    last = grid["cells"][-1]
    assert [cell[0] for cell in last] == greedy
    assert all(cell[2] in ("committed", "accepted") for cell in last)
    assert all(0.0 <= cell[1] <= 1.0 for row in grid["cells"] for cell in row if cell)

    paths = ddgviz(model, tokenizer, "DEFGH", max_new_tokens=12, out_path=tmp_path / "run")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count("<tr>") == len(grid["cells"]) + 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama with a small BPE tokenizer, as a MODEL folder for the commands."""
    from hf_fastattn.conversion.tiny import corpus, tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer(corpus(5_000), vocab_size=200)
    tiny_llama(vocab_size=len(tokenizer), hidden_size=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_generate_command_compares_with_greedy(tiny_dir, capsys):
    code = cli_main(["generate", str(tiny_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--compare"])
    assert code == 0
    assert "identical output: True" in capsys.readouterr().err


def test_ddgviz_command(tiny_dir, tmp_path):
    assert (
        cli_main(
            ["ddgviz", str(tiny_dir), "--prompt", "ROMEO:", "--out", str(tmp_path), "--max-new-tokens", "8"]
        )
        == 0
    )
    assert (tmp_path / "ddgviz.png").is_file() and (tmp_path / "ddgviz.html").is_file()


def _forbid_model_loading(monkeypatch):
    """Make loading a model or tokenizer fail the test: the arguments must be checked first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


def _one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["generate", "ddgviz"])
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", ""], "argument --prompt: is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["--prompt", "hi", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be at least 1, got -3"),
        (["--prompt", "hi", "--block-size", "0"], "argument --block-size: must be at least 1, got 0"),
    ],
    ids=["empty-prompt", "zero-tokens", "negative-tokens", "zero-block"],
)
def test_bad_arguments_are_one_line_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, command, extra, message):
    _forbid_model_loading(monkeypatch)
    out = ["--out", str(tmp_path / "viz")] if command == "ddgviz" else []
    assert cli_main([command, str(tiny_dir), *extra, *out]) == 2
    _one_line_error(capsys, f"hf-fastattn {command}: error: {message}")
    assert not (tmp_path / "viz").exists()


@pytest.mark.parametrize("command", ["generate", "ddgviz"])
def test_missing_local_model_is_reported_without_the_hub(tmp_path, capsys, monkeypatch, command):
    """A path that can only be local is reported at once; neither transformers nor the Hub is asked."""
    _forbid_model_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ["./does/not/exist", "../nope", str(tmp_path / "missing"), "~/no-such-model-here", "a/b/c",
                 "outputs/run1", "model.gguf"]:
        assert cli_main([command, name, "--prompt", "hi"]) == 2, name
        _one_line_error(capsys, f"MODEL {name!r}: no such local folder")
    (tmp_path / "weights.bin").write_bytes(b"")
    assert cli_main([command, "weights.bin", "--prompt", "hi"]) == 2
    _one_line_error(capsys, "MODEL 'weights.bin' is a file")


def test_unknown_hub_id_is_one_line(capsys, monkeypatch, tmp_path):
    """A name that may be a Hub id goes to transformers (offline here); its failure is one line, exit code 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["generate", "no-such-org/no-such-model-xyz", "--prompt", "hi"]) == 2
    _one_line_error(capsys, "cannot load MODEL 'no-such-org/no-such-model-xyz' as a Hub id")


def test_ddgviz_out_must_be_a_folder(tiny_dir, tmp_path, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    target = tmp_path / "picture.png"
    target.write_bytes(b"not yours")
    assert cli_main(["ddgviz", str(tiny_dir), "--prompt", "hi", "--out", str(target)]) == 2
    _one_line_error(capsys, f"--out {str(target)!r} is a file")
    assert cli_main(["ddgviz", str(tiny_dir), "--prompt", "hi", "--out", str(target / "sub")]) == 2
    _one_line_error(capsys, "cannot be created")
    assert target.read_bytes() == b"not yours"


def test_bench_jacobi_quick(tmp_path):
    assert cli_main(["bench", "jacobi", "--quick", "--out", str(tmp_path)]) == 0
    assert "identical" in (tmp_path / "quick_jacobi.md").read_text()
    assert (tmp_path / "quick_jacobi.png").is_file()


def test_bench_jacobi_model_quick(tmp_path):
    """`bench jacobi --model MODEL --quick` on a saved tiny chat model: every method side by side, the tables
    written, greedy methods' outputs identical to greedy's."""
    from hf_fastattn.conversion.tiny import corpus, tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "chat"
    tokenizer = tiny_tokenizer(corpus(5_000), vocab_size=200)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tiny_llama(vocab_size=len(tokenizer), hidden_size=32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cli_main(["bench", "jacobi", "--model", str(model_dir), "--quick", "--out", str(out)]) == 0
    report = next(out.glob("*.md")).read_text()
    import re

    for row in ("greedy", "prompt_lookup", "lookahead", "jacobi", "gs_jacobi", "hybrid", "plain sampling"):
        assert re.search(rf"\|\s+{row} \|", report), row
    greedy_rows = [line for line in report.splitlines() if re.match(r"\|\s+(greedy|prompt_lookup|lookahead|jacobi|gs_jacobi|hybrid) \|", line)]
    method_rows = [line for line in greedy_rows if line.count("|") == len(HEADER) + 1]  # (not the by-kind table)
    assert method_rows and all(line.rstrip().endswith("2/2 |") for line in method_rows)  # identical to greedy
    assert "by task kind" in report  # (--quick: two input-grounded prompts, no open-ended one)


def test_bench_jacobi_reports_grounded_and_open_ended_prompts_apart():
    res = {
        "greedy": {"time": [2.0, 2.0, 1.0]},
        "prompt_lookup": {"time": [1.0, 2.0, 2.0]},
        "lookahead": {"time": [1.0, 1.0, 2.0]},
    }
    rows = _kind_rows(res, ["greedy", "prompt_lookup", "lookahead"], ["summarize", "answer", "open-ended"])
    assert rows == [
        ["prompt_lookup", "1.33x", "1.00x", "0.50x", "1.00x"],
        ["lookahead", "2.00x", "1.50x", "0.50x", "1.00x"],
    ]


@pytest.mark.parametrize("script", ["jacobi_generate.py", "ddgviz_demo.py"])
def test_example_runs(script, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script), "--tiny", "--max-new-tokens", "10"]
    if script == "ddgviz_demo.py":
        args += ["--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if script == "jacobi_generate.py":
        assert "identical to greedy generate: yes" in result.stdout
