"""Smoke test of `hf-fastattn bench kernels`: `--quick` (CPU, Triton interpreter) without a GPU, short lengths on the
GPU with one. It runs every kernel and writes its table, plot and JSON. Timings are not checked (they mean nothing
in the interpreter, and little at these sizes)."""

import json
import re

import pytest

pytest.importorskip("triton")

from hf_fastattn.showcase.bench.kernels import main  # noqa: E402

from .helpers import DEVICE  # noqa: E402

pytestmark = pytest.mark.triton
ON_GPU = DEVICE.type == "cuda"


def test_bench_kernels_quick(tmp_path, capsys):
    # on a GPU: ours and sdpa (fla, when installed, autotunes each kernel for minutes at its first call)
    small = ["--lengths", "64", "128", "--heads", "2", "--head-dim", "16", "--dtype", "float32"]
    small += ["--methods", "sdpa", "linear", "linear-torch", "fast-1", "fast-2", "sparse"]
    assert main([*(small if ON_GPU else ["--quick"]), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert set(data["results"]) >= {"sdpa", "linear", "linear-torch", "fast-1", "fast-2", "sparse"}
    for by_mode in data["results"].values():
        for mode in ("fwd", "fwd+bwd"):
            assert len(by_mode[mode]) == len(data["lengths"]) and all(t > 0 for t in by_mode[mode])
    assert (tmp_path / "kernels.png").stat().st_size > 0
    # the header's cells are padded to the widest value: "|   N |" with 3-digit lengths
    assert re.search(r"^\|\s*N\s*\|\s*method\s*\|", (tmp_path / "kernels.md").read_text(), re.MULTILINE)


def test_bench_kernels_refuses_what_cannot_run_here(tmp_path, capsys):
    # without a GPU only --quick runs; with one (and no interpreter) --quick cannot
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(tmp_path)] if ON_GPU else ["--out", str(tmp_path)])
    assert ("TRITON_INTERPRET=1" if ON_GPU else "needs a CUDA GPU") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*([] if ON_GPU else ["--quick"]), "--methods", "nope", "--out", str(tmp_path)])
    assert "unknown or unavailable methods ['nope']" in capsys.readouterr().err
