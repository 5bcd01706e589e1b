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
    from hf_fastattn.bench.conversion import main

    assert main(["--quick", "--methods", "hedgehog", "mqa", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "teacher (softmax)" in out and "hedgehog" in out and "all-MiniLM-L6-v2" in out
    assert (tmp_path / "conversion.png").is_file() and (tmp_path / "conversion.md").is_file()
