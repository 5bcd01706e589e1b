"""Smoke tests: the three examples in `--tiny` form and `bench conversion --quick` run offline."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["convert_finetune_trainer.py", "lora_peft.py", "convert_accelerate.py"])
def test_example_runs(tmp_path, script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()


def test_bench_conversion_quick(tmp_path, capsys):
    from hf_fastattn.showcase.bench.conversion import main

    assert main(["--quick", "--methods", "hedgehog", "mqa", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "teacher (softmax)" in out and "hedgehog" in out and "all-MiniLM-L6-v2" in out
    assert (tmp_path / "conversion.png").is_file() and (tmp_path / "conversion.md").is_file()


def test_window_only_control_is_the_teacher_on_its_last_window_tokens():
    """The `window-only` row of `bench conversion`: the teacher's own softmax attention over the last `window` tokens
    only, checked against sdpa with that band as an explicit 4D mask."""
    import dataclasses

    import torch
    from transformers import LlamaForCausalLM

    from hf_fastattn.showcase.bench import conversion
    from hf_fastattn.showcase.tinylm import tiny_llama_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(64, hidden_size=32, num_layers=2, num_heads=2)).eval()
    window = 4
    recipe = conversion.RECIPES["window-only"]
    control = dataclasses.replace(recipe, options={**recipe.options, "window": window})
    try:
        conversion.RECIPES["window-only-test"] = control
        model, trained = conversion.convert_and_uptrain(teacher, "window-only-test", None, 0, 1, "unused")
    finally:
        del conversion.RECIPES["window-only-test"]
    assert trained == 0
    ids = torch.randint(3, 64, (2, 12))
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    band = ((j <= i) & (i - j < window))[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        expected = teacher(ids, attention_mask=band).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the band matters: beyond the window the full causal teacher differs
        assert not torch.allclose(teacher(ids).logits[:, window:], got[:, window:], atol=1e-3)


def test_teacher_seq_len_trains_the_teacher_on_longer_sequences_with_the_same_tokens(monkeypatch, tmp_path):
    """`--teacher-seq-len 512` asks tinylm for a teacher trained on 512-token sequences at 2048 tokens per step (the
    default teacher's 16 x 128), so its token count, and the 10% budget, stay the same; `--teacher-steps` (default
    1000) sets its steps."""
    import hf_fastattn.showcase.tinylm as tinylm
    from hf_fastattn.showcase.bench.conversion import main

    asked = []

    class Stop(Exception):
        pass

    def fake_teacher(**kwargs):
        asked.append(kwargs)
        raise Stop

    monkeypatch.setattr(tinylm, "get_tiny_llama", fake_teacher)
    cases = (
        (["--teacher-seq-len", "512"], {"steps": 1000, "seq_len": 512, "batch_size": 4}),
        ([], {"steps": 1000}),
        (["--teacher-steps", "300"], {"steps": 300}),
    )
    for argv, expected in cases:
        with pytest.raises(Stop):
            main([*argv, "--no-minilm", "--methods", "linear", "--out", str(tmp_path)])
        assert asked.pop() == expected
    with pytest.raises(SystemExit):
        main(["--teacher-seq-len", "0", "--out", str(tmp_path)])


def test_bench_conversion_real_model_path(tmp_path, tokenizer):
    """`bench conversion --model DIR`: the controls and a method through the recipes, perplexity at each length; a
    64-token window covers 32-token validation windows, so the window controls equal the original there (and not
    at 128 tokens, where the window cuts context)."""
    import json

    from conftest import tiny_model

    from hf_fastattn.showcase.bench.conversion import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    argv = ["--model", str(src), "--methods", "mqa", "--max-tokens", "128", "--seq-len", "32"]
    argv += ["--lengths", "32", "128", "--eval-tokens", "256", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "conversion-real.json").read_text())
    rows = {r["model"]: r for r in record["rows"]}
    assert list(rows) == ["original (sdpa)", "window-only", "window-sinks", "mqa"]
    original = rows["original (sdpa)"]["ppl"]
    for control in ("window-only", "window-sinks"):
        assert rows[control]["ppl"]["32"] == pytest.approx(original["32"], rel=1e-4)
        assert rows[control]["ppl"]["128"] != pytest.approx(original["128"], rel=1e-5)
        assert rows[control]["tokens"] == 0
    assert 0 < rows["mqa"]["tokens"] <= 128
    assert "mqa" in record["verdicts"] and (out / "conversion-real.png").is_file()
    # --no-controls: the original and the methods only
    assert main([*argv[:-1], str(tmp_path / "out2"), "--no-controls", "--lengths", "32"]) == 0
    record = json.loads((tmp_path / "out2" / "conversion-real.json").read_text())
    assert [r["model"] for r in record["rows"]] == ["original (sdpa)", "mqa"]
