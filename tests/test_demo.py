"""`hf-fastattn demo --quick`, run in-process into a temporary folder (its teacher trained there too): the files it
writes and the numbers in them."""

import json
import math
import re

import pytest
import torch

from hf_fastattn import demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(output folder, results.json, teacher cache folder) of one `--quick` run."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp, torch.enable_grad():
        mp.setenv("HF_FASTATTN_CACHE", str(cache))
        threads = torch.get_num_threads()
        assert demo.main(["--quick", "--out", str(out)]) == 0
        assert torch.get_num_threads() == threads  # restored
    return out, json.loads((out / "results.json").read_text()), cache


def test_writes_tables_plots_and_a_self_contained_report(quick_run):
    out, results, _ = quick_run
    tables = (out / "results.md").read_text()
    for title in demo.results_tables(results):
        assert title in tables
    for name in ("teacher", *demo.METHODS, "greedy", *demo.JACOBI_MODES):
        assert re.search(rf"^\|\s+{name} \|", tables, re.M), name
    for png in ("perplexity.png", "decoding.png", "jacobi.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    assert "src='http" not in page and "<table>" in page


def test_perplexities_are_finite(quick_run):
    _, results, _ = quick_run
    assert set(results["models"]) == {"teacher", *demo.METHODS}
    for name, record in results["models"].items():
        assert math.isfinite(record["val_ppl"]) and 1 < record["val_ppl"] < 512, name
    assert all(results["models"][m]["train_tokens"] > 0 for m in demo.METHODS)


def test_recurrent_state_is_constant_and_kv_cache_grows(quick_run):
    _, results, _ = quick_run
    by_model = {}
    for record in results["decoding"]:
        by_model.setdefault(record["model"], []).append(record)
        assert record["s_per_token"] > 0
    contexts = [r["context"] for r in by_model["teacher"]]
    assert len(contexts) >= 2 and contexts == sorted(contexts)
    assert {r["cache"] for r in by_model["t2r"]} == {"RecurrentCache"}
    assert len({r["cache_bytes"] for r in by_model["t2r"]}) == 1 and by_model["t2r"][0]["cache_bytes"] > 0
    for model in ("teacher", "mqa"):
        assert {r["cache"] for r in by_model[model]} == {"DynamicCache"}
        sizes = [r["cache_bytes"] for r in by_model[model]]
        assert all(a < b for a, b in zip(sizes, sizes[1:])), (model, sizes)
    # MQA keeps one K/V head of the teacher's four
    assert by_model["mqa"][0]["cache_bytes"] * 4 == by_model["teacher"][0]["cache_bytes"]


def test_jacobi_outputs_were_asserted_identical(quick_run):
    _, results, _ = quick_run
    jacobi = results["jacobi"]
    assert jacobi["identical"] is True
    assert jacobi["outputs_compared"] == len(demo.JACOBI_MODES) * demo.QUICK.jacobi_prompts
    totals = jacobi["totals"]
    assert totals["greedy"]["passes"] == totals["greedy"]["tokens"]
    for mode in demo.JACOBI_MODES:
        assert totals[mode]["tokens"] == totals["greedy"]["tokens"]
        assert 0 < totals[mode]["passes"] <= totals[mode]["tokens"] + 1


def test_runs_on_a_local_model_folder(quick_run, tmp_path):
    """--model with a saved checkpoint (here the quick teacher the first run cached)."""
    _, _, cache = quick_run
    (folder,) = cache.iterdir()
    with torch.enable_grad():
        assert demo.main(["--quick", "--model", str(folder), "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teacher"] == str(folder)
    assert all(math.isfinite(r["val_ppl"]) for r in results["models"].values())


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing-model"])
def test_bad_model_is_a_clear_error(name, tmp_path, capsys):
    assert demo.main(["--quick", "--model", name, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hf-fastattn demo: error: --model" in err and "no such folder" in err
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert demo.main(["--quick", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load --model" in capsys.readouterr().err
