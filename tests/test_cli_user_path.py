"""The user's path through the command line and the Python API: help for every command and option, one-line errors
before any work, and the Jacobi API refusing inputs it cannot decode."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from hf_fastattn.cli import BENCHMARKS, COMMANDS
from hf_fastattn.cli import main as cli_main
from hf_fastattn.generation.jacobi import jacobi_decoding, jacobi_generate
from hf_fastattn.loading import ModelLoadError, check_model_path, check_output_dir, looks_local

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    **{name: target for name, (target, _) in COMMANDS.items()},
    **{f"bench {name}": f"hf_fastattn.showcase.bench.{name}:main" for name in BENCHMARKS},
}


class _Parsed(Exception):
    pass


def parser_of(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a sub-command's `main` builds, caught when it parses (nothing of the command runs)."""

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    module_name, func_name = target.split(":")
    main = getattr(importlib.import_module(module_name), func_name)
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parsed) as caught:
            main([])
    return caught.value.args[0]


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_every_option_has_help_with_its_default(command, monkeypatch):
    parser = parser_of(ENTRY_POINTS[command], monkeypatch)
    formatter = parser._get_formatter()
    # an option of a required either-or group (convert's --train-file / --dataset) has no default to show
    either_or = {id(a) for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command}: {name} has no help"
        help_text = formatter._expand_help(action)
        # an option that takes a value and may be left out must say what it is then
        takes_value = action.nargs != 0 and action.option_strings and not action.required
        takes_value = takes_value and id(action) not in either_or
        if takes_value:
            assert "default" in help_text.lower(), f"{command}: {name}'s help does not give its default: {help_text!r}"
    # and the help page itself renders
    assert parser.format_help().startswith("usage:")


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_help_exits_0(command, capsys):
    assert cli_main([*command.split(), "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_top_level_and_bench_help(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in [*COMMANDS, "bench"]:
        line = next((line for line in lines if line.split()[:1] == [name]), None)
        assert line is not None and len(line.split()) > 3, f"{name} is not listed with a description"

    assert cli_main(["bench", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, description in BENCHMARKS.items():
        assert any(line.split()[:1] == [name] and description in line for line in lines), name

    assert cli_main(["bench"]) == 2 and "choose one of attention" in capsys.readouterr().err
    assert cli_main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    assert cli_main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_missing_model_path_fails_fast_in_a_real_process(tmp_path):
    """The command as a user runs it: exit code 2 and one line, as soon as Python has imported the package.

    Importing torch and transformers alone takes seconds (about 5 s on a busy 2-core machine), so the time is
    compared with a bare import of the package in the same environment: what is left must be small (before the
    path check, transformers read the path as a Hub id, and online the Hub was retried for about 50 s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*args):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        return result, time.perf_counter() - start

    _, import_seconds = run("-c", "import hf_fastattn.cli")
    result, seconds = run("-m", "hf_fastattn.cli", "generate", "./does/not/exist", "--prompt", "hi")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "hf-fastattn generate: error: MODEL './does/not/exist': no such local folder (a local path, so the Hub "
        "was not tried) (see --help)"
    ]
    assert seconds < import_seconds + 5, f"{seconds:.1f} s, of which {import_seconds:.1f} s importing"


# ---------------------------------------------------------------------------------------------------------------
# hf_fastattn.loading


@pytest.mark.parametrize(
    "name,local",
    [
        ("./m", True),
        ("../m", True),
        ("/abs/m", True),
        ("~/m", True),
        (".", True),
        ("a/b/c", True),
        ("m.gguf", True),
        ("SmolLM2.Q4.GGUF", True),
        ("gpt2", False),
        ("HuggingFaceTB/SmolLM2-135M", False),
    ],
)
def test_looks_local(name, local):
    assert looks_local(name) is local


def test_looks_local_first_component_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("outputs/run1")
    (tmp_path / "outputs").mkdir()
    assert looks_local("outputs/run1")


def test_check_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert check_model_path("model") == "model"
    assert check_model_path("org/name") == "org/name"  # a Hub id: left to transformers
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_model_path("~/model") == str(tmp_path / "model")
    with pytest.raises(ModelLoadError, match=r"--model '\./gone': no such local folder"):
        check_model_path("./gone", "--model")
    with pytest.raises(ModelLoadError, match="MODEL is empty"):
        check_model_path("")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file; give the folder holding config.json"):
        check_model_path("config.json")
    assert issubclass(ModelLoadError, ValueError)


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"--out '.*f' is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="cannot be created"):
        check_output_dir(tmp_path / "f" / "sub", flag="--dir")


# ---------------------------------------------------------------------------------------------------------------
# The Python API: jacobi_generate / generate(custom_generate=jacobi_decoding)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("llama")


def _empty_prompt_calls(model, ids):
    return {
        "jacobi_generate": lambda: jacobi_generate(model, ids, max_new_tokens=4),
        "custom_generate": lambda: model.generate(ids, max_new_tokens=4, custom_generate=jacobi_decoding),
        "jacobi_decoding": lambda: jacobi_decoding(model, ids, max_new_tokens=4),
    }


@pytest.mark.parametrize("entry", ["jacobi_generate", "custom_generate", "jacobi_decoding"])
def test_empty_prompt_is_a_clear_value_error(model, entry):
    ids = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape \(1, 0\)\)"):
        _empty_prompt_calls(model, ids)[entry]()


@pytest.mark.parametrize("entry", ["jacobi_generate", "jacobi_decoding"])
def test_empty_batch_of_prompts_is_a_clear_value_error(model, entry):
    """A batch of empty prompts too; `generate(custom_generate=...)` itself fails on one with an IndexError (its
    padding check reads the last column) before it calls us, so only our own entry points can say it clearly."""
    ids = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape \(2, 0\)\)"):
        _empty_prompt_calls(model, ids)[entry]()


def test_no_prompt_starts_from_bos_like_greedy(model):
    """input_ids=None is not an empty prompt: generate starts from the BOS token, and so does Jacobi decoding."""
    greedy = model.generate(None, max_new_tokens=6, do_sample=False)
    assert greedy[0, 0].item() == model.config.bos_token_id
    assert jacobi_generate(model, None, max_new_tokens=6).tolist() == greedy.tolist()


@pytest.mark.parametrize("max_new_tokens", [0, -2])
def test_max_new_tokens_below_one_is_refused_as_greedy_does(model, max_new_tokens):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens") as greedy:
        model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    with pytest.raises(ValueError, match="max_new_tokens") as jacobi:
        jacobi_generate(model, ids, max_new_tokens=max_new_tokens)
    assert str(jacobi.value) == str(greedy.value)


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True, "4"])
def test_bad_block_size(model, block_size):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"block_size=.* must be a positive integer"):
        jacobi_generate(model, ids, max_new_tokens=4, block_size=block_size)
    with pytest.raises(ValueError, match=r"block_size=.* must be a positive integer"):
        model.generate(ids, max_new_tokens=4, custom_generate=jacobi_decoding, block_size=block_size)


def test_one_dimensional_prompt(model):
    with pytest.raises(ValueError, match=r"shape \[batch, prompt_length\], got \(3,\)"):
        jacobi_generate(model, torch.tensor([5, 6, 7]), max_new_tokens=4)
