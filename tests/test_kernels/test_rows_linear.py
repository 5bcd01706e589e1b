"""`kernels.rows_linear`: the CPU kernel for linear layers over a few rows, against `F.linear`."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hf_fastattn.kernels import rows_linear as module

AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def test_builds_where_avx512_is():
    """On an AVX-512 CPU (this project's machines) the kernel must build: a silent fallback would hide a broken
    build behind the other routes."""
    if os.environ.get("HF_FASTATTN_CPU_KERNELS", "1") == "0":
        assert not module.available()
    else:
        assert module.available() == AVX512


needs_kernel = pytest.mark.skipif(not AVX512, reason="the rows kernel needs AVX-512 (checked above)")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (3, 15), (4, 16), (7, 17), (64, 576), (130, 40)])
def test_equals_linear(threads, rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features)
    weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with_bias, without = module.rows_linear(x, weight, bias), module.rows_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    # float32 sums in another order: the error bound grows with the inner dimension
    tol = {"rtol": 1e-5, "atol": 1e-5 * max(1.0, in_features**0.5)}
    torch.testing.assert_close(with_bias, F.linear(x, weight, bias), **tol)
    torch.testing.assert_close(without, F.linear(x, weight), **tol)
    assert with_bias.shape == (rows, out_features) and with_bias.is_contiguous()


@needs_kernel
def test_takes_a_non_contiguous_input_and_rejects_what_it_cannot_compute():
    weight = torch.randn(8, 32)
    x = torch.randn(32, 3).t()  # [3, 32], not contiguous
    torch.testing.assert_close(module.rows_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        module.rows_linear(x.to("meta"), weight.to("meta"))
    with pytest.raises(RuntimeError, match="float32 only"):
        module.rows_linear(x.double(), weight.double())
    with pytest.raises(RuntimeError, match="contiguous"):
        module.rows_linear(x, torch.randn(32, 8).t())
    with pytest.raises(RuntimeError, match=r"x \[M, K\], weight \[N, K\]"):
        module.rows_linear(x, torch.randn(8, 31))
    with pytest.raises(RuntimeError, match=r"bias \[N\]"):
        module.rows_linear(x, weight, torch.randn(7))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(module._EXTENSION, "_tried", False)
    monkeypatch.setattr(module._EXTENSION, "_module", None)
    monkeypatch.setenv("HF_FASTATTN_CPU_KERNELS", "0")
    assert not module.available()
    with pytest.raises(RuntimeError, match="not available"):
        module.rows_linear(torch.randn(2, 4), torch.randn(3, 4))
