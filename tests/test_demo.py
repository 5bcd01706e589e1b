"""`hf-fastattn demo --quick`, run in-process into a temporary folder (its teacher trained there too): the files it
writes and the numbers in them."""

import json
import math
import re

import pytest
import torch

from hf_fastattn.showcase import demo


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
    for name in ("teacher", *demo.METHODS, *demo.CONTROLS, "greedy", *demo.JACOBI_MODES):
        assert re.search(rf"^\|\s+{name} \|", tables, re.M), name
    for png in demo.PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(demo.PLOTS) == 5
    assert "src='http" not in page and "<table>" in page
    # every section explains itself, in the markdown and in the page
    for title, note in demo.section_notes(results).items():
        assert len(note) > 100 and note in tables and title in page, title


def test_control_sits_beside_the_hybrid(quick_run):
    _, results, _ = quick_run
    names = list(results["models"])
    for control, target in demo.CONTROLS.items():
        assert names.index(control) == names.index(target) + 1
        assert results["models"][control]["train_tokens"] == 0
        assert "control for" in results["models"][control]["attention"]


def test_models_are_kept_and_reload_with_the_same_outputs(quick_run):
    """The converted models are saved under --out/models and reload (after `import hf_fastattn`) to the same
    logits; `hf-fastattn generate` runs on one of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fastattn.generation.cli import generate_main

    out, results, cache = quick_run
    assert set(results["saved"]) == {"teacher", *demo.METHODS, *demo.CONTROLS}
    (teacher_folder,) = [p for p in cache.iterdir() if p.is_dir()]  # (row_plans.json: the decoding fast path's)
    reference = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    ids = torch.randint(3, 200, (1, 40))
    for name, path in results["saved"].items():
        assert path == str(out / "models" / name)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        assert AutoTokenizer.from_pretrained(path) is not None
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all(), name
        if name == "teacher":
            torch.testing.assert_close(logits, reference(ids).logits)
    assert generate_main([results["saved"]["hedgehog"], "--prompt", "ROMEO:", "--max-new-tokens", "8", "--compare"]) == 0


def test_decoding_reaches_the_crossover(quick_run):
    """The decode measurement goes past the teacher's 2048 positions and marks where each converted model
    overtakes the teacher; the recurrent caches are smaller than the teacher's K/V by the longest context."""
    _, results, _ = quick_run
    assert max(d["context"] for d in results["decoding"]) >= 8192
    for name in ("t2r", "hedgehog"):
        cache = results["crossovers"][name]["cache"]
        assert cache["status"] == "crosses", cache
        ours = {d["context"]: d["cache_bytes"] for d in results["decoding"] if d["model"] == name}
        teacher = {d["context"]: d["cache_bytes"] for d in results["decoding"] if d["model"] == "teacher"}
        below = [c for c in ours if c < cache["from"]]
        above = [c for c in ours if c > cache["from"]]
        assert all(ours[c] > teacher[c] for c in below) and all(ours[c] < teacher[c] for c in above)


def test_pretrained_sections(quick_run):
    """Sections 4-6 (on the quick teacher here; the full demo's default is smollm2-135m): every attention swapped in
    is scored, sdpa is the reference, a covering sparse pattern equals it; the architecture's decoding has sdpa,
    linear and the hybrid, the recurrent caches constant and smaller than the K/V cache at the longest context."""
    _, results, _ = quick_run
    real = results["pretrained"]
    assert demo.QUICK.pretrained is None and real["model"].startswith("the teacher")
    swap = {r["variant"]: r for r in real["swap"]}
    assert {"sdpa", "sparse-strided", "sparse-fixed", "mqa", "linear (untrained)", "fast (untrained)"} <= set(swap)
    assert swap["sdpa"]["x_sdpa"] == 1.0 and abs(swap["sparse-strided"]["x_sdpa"] - 1) < 1e-4  # stride 128 > 64
    assert all(math.isfinite(r["ppl"]) for r in real["swap"])
    by_model = {}
    for record in real["decoding"]:
        by_model.setdefault(record["model"], []).append(record)
    assert set(by_model) == {"sdpa", "linear", "hybrid"}
    for name in ("linear", "hybrid"):
        assert {r["cache"] for r in by_model[name]} == {"RecurrentCache"}
        assert len({r["cache_bytes"] for r in by_model[name]}) == 1
        assert by_model[name][-1]["cache_bytes"] < by_model["sdpa"][-1]["cache_bytes"]
    assert set(real["crossovers"]) == {"linear", "hybrid"}


def test_crossover_interpolates_between_measured_contexts():
    rows = lambda name, values: [{"model": name, "context": c, "v": v} for c, v in zip((100, 400, 1600), values)]
    decoding = rows("teacher", [1.0, 2.0, 4.0]) + rows("a", [3.0, 3.0, 3.0]) + rows("b", [0.5, 1, 1]) + rows("c", [9, 9, 9])
    crossing = demo.crossover(decoding, "a", "teacher", "v")
    assert crossing["status"] == "crosses" and 400 < crossing["from"] < 1600
    assert crossing["from"] == 800  # the gap goes 1 -> -1: halfway in log context
    assert demo.crossover(decoding, "b", "teacher", "v") == {"status": "always", "from": 100}
    assert demo.crossover(decoding, "c", "teacher", "v") == {"status": "never", "up_to": 1600}


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--quick", "--out", str(target)])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_perplexities_are_finite(quick_run):
    _, results, _ = quick_run
    assert set(results["models"]) == {"teacher", *demo.METHODS, *demo.CONTROLS}
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
    for model in ("t2r", "hedgehog"):  # linear attention and the hybrid: constant bytes
        assert {r["cache"] for r in by_model[model]} == {"RecurrentCache"}
        assert len({r["cache_bytes"] for r in by_model[model]}) == 1 and by_model[model][0]["cache_bytes"] > 0
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
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    with torch.enable_grad():
        assert demo.main(["--quick", "--model", str(folder), "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["teacher"] == str(folder) and results["pretrained"]["model"] == str(folder)
    assert all(math.isfinite(r["val_ppl"]) for r in results["models"].values())


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing-model"])
def test_bad_model_is_a_clear_error(name, tmp_path, capsys):
    assert demo.main(["--quick", "--model", name, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hf-fastattn demo: error: --model" in err and "no such local folder" in err
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert demo.main(["--quick", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load --model" in capsys.readouterr().err
