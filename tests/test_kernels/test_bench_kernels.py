"""Smoke test of `hf-fastattn bench kernels --quick` (CPU, Triton interpreter): it runs every kernel and writes its
table, plot and JSON. Timings are not checked (they mean nothing in the interpreter)."""

import json

import pytest

pytest.importorskip("triton")

from hf_fastattn.bench.kernels import main  # noqa: E402

pytestmark = pytest.mark.triton


def test_bench_kernels_quick(tmp_path, capsys):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert set(data["results"]) >= {"sdpa", "linear", "fast-1", "fast-2", "sparse"}
    for by_mode in data["results"].values():
        for mode in ("fwd", "fwd+bwd"):
            assert len(by_mode[mode]) == len(data["lengths"]) and all(t > 0 for t in by_mode[mode])
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert "| N | method |" in (tmp_path / "kernels.md").read_text().replace("  ", " ")


def test_bench_kernels_without_gpu_says_so(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "nope", "--out", str(tmp_path)])
