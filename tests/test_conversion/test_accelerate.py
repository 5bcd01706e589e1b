"""The uptraining recipe under `accelerate launch` with 2 CPU processes (gloo) matches 1 process, same global batch.

Note: in accelerate 1.15 `accelerate launch --cpu --num_processes 2` starts ONE process (the simple launcher; multi-CPU
needs MPI). `--multi_gpu --num_processes 2` on a host without GPUs starts 2 torchrun processes on CPU with gloo.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "convert_accelerate.py"


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_match_one(tmp_path):
    one = _run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "one")], tmp_path / "one")
    two = _run(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(SCRIPT),
            "--tiny",
            "--out",
            str(tmp_path / "two"),
        ],
        tmp_path / "two",
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert math.isclose(one["perplexity"], two["perplexity"], rel_tol=1e-4)
    assert one["map_sums"].keys() == two["map_sums"].keys()
    for name, value in one["map_sums"].items():
        assert math.isclose(value, two["map_sums"][name], rel_tol=1e-5, abs_tol=1e-5), name
    # and training did move the maps away from their identity init (sum 64 per layer)
    assert any(abs(v - 64) > 1e-3 for n, v in one["map_sums"].items() if n.endswith("weight"))
