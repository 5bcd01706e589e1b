"""Smoke tests of the examples owned by the core: each runs offline in tiny form."""

import subprocess
import sys
from pathlib import Path

import hf_fastattn

ROOT = Path(__file__).resolve().parents[1]


def test_register_and_run_tiny():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "register_and_run.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for impl in hf_fastattn.IMPLEMENTATIONS:  # every registered variant
        assert f"{impl}:" in result.stdout
