"""Backend dispatch: argument and environment validation, auto choice, Triton on CPU only in the interpreter."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_fastattn.kernels import dispatch
from hf_fastattn.kernels.dispatch import resolve_backend

from .helpers import DEVICE

pytestmark = pytest.mark.triton

CPU = torch.zeros(1)
KERNEL = torch.zeros(1, device=DEVICE)  # where the kernels run in this session: CUDA, or CPU in the interpreter


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("HF_FASTATTN_BACKEND", raising=False)


def test_session_runs_compiled_kernels_on_a_gpu_and_the_interpreter_without():
    """The root conftest sets TRITON_INTERPRET=1 only without a CUDA GPU, so a GPU machine tests compiled kernels."""
    if not torch.cuda.is_available():
        assert dispatch.interpreter_enabled() and DEVICE.type == "cpu"
    else:  # compiled, unless TRITON_INTERPRET=1 was set by hand before the session
        assert DEVICE.type == ("cpu" if dispatch.interpreter_enabled() else "cuda")


def test_torch_and_auto_on_cpu_give_torch():
    assert resolve_backend("torch", CPU) == "torch"
    assert resolve_backend("auto", CPU) == "torch"


def test_bad_backend_names_valid_values(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv("HF_FASTATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"HF_FASTATTN_BACKEND must be one of .*got 'fast'"):
        resolve_backend("auto", CPU)


def test_env_overrides_argument(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HF_FASTATTN_BACKEND", "triton")
    assert resolve_backend("torch", KERNEL) == "triton"
    monkeypatch.setenv("HF_FASTATTN_BACKEND", "torch")
    assert resolve_backend("triton", KERNEL) == "torch"
    assert resolve_backend("triton", CPU) == "torch"


def test_auto_picks_triton_on_cuda_only():
    pytest.importorskip("triton")
    assert resolve_backend("auto", KERNEL) == ("triton" if KERNEL.is_cuda else "torch")
    assert resolve_backend("auto", KERNEL, CPU) == "torch"  # mixed devices: the PyTorch form


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.interpreter_ready():  # triton was imported in interpreter mode (no GPU here)
        assert resolve_backend("triton", CPU) == "triton"
    else:  # a GPU session: triton was imported compiled, too late for the interpreter, and the error says why
        with pytest.raises(RuntimeError, match="imported before"):
            resolve_backend("triton", CPU)


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        resolve_backend("triton", CPU)
    assert resolve_backend("auto", CPU) == "torch"


def test_operator_raises_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from hf_fastattn.ops.fast import fast_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fast_attention(q, q, q, causal=True, backend="triton")


def test_interpreter_set_after_triton_import_is_a_clear_error():
    """Triton decorates its own library (tl.sum, tl.cdiv, ...) at `import triton`: if TRITON_INTERPRET=1 comes later,
    the interpreter cannot run the kernels, and the operator must say so instead of failing mid-launch."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import os, torch, triton
        from hf_fastattn.ops.linear import linear_attention
        q = torch.randn(1, 2, 5, 16)
        for env in (None, "1"):
            if env:
                os.environ["TRITON_INTERPRET"] = env
            try:
                linear_attention(q, q, q, causal=True, backend="triton")
                raise SystemExit(f"no error with TRITON_INTERPRET={env}")
            except RuntimeError as e:
                assert "TRITON_INTERPRET" in str(e), e
                if env:
                    assert "before" in str(e), e
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_FASTATTN_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_interpreter_set_before_python_starts_runs_the_kernels():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from hf_fastattn.ops.linear import linear_attention
        q = torch.randn(1, 2, 5, 16)
        torch.testing.assert_close(
            linear_attention(q, q, q, causal=True, backend="triton"), linear_attention(q, q, q, causal=True, backend="torch")
        )
        print("ok")
        """
    )
    env = {**{k: v for k, v in os.environ.items() if k != "HF_FASTATTN_BACKEND"}, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "cannot run a loop with a run-time bound" in res.stderr:  # triton 3.6 with numpy 2.4 (seen on a GPU machine)
        pytest.skip(res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_interpreter_that_cannot_loop_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not dispatch.interpreter_ready():
        pytest.skip("triton was imported compiled (a GPU session): the interpreter cannot be probed in this process")
    # the probe itself, in this interpreter: every other kernel test here runs its loops, so it must find none broken
    assert dispatch.interpreter_loop_error() is None
    reason = "Triton 3.6.0's interpreter cannot run a loop with a run-time bound under numpy 2.4.6 (...)"
    monkeypatch.setattr(dispatch, "interpreter_loop_error", lambda: reason)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        resolve_backend("triton", CPU)


def test_kernels_package_imports_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton now fails
        import hf_fastattn.kernels as k
        from hf_fastattn.kernels.dispatch import resolve_backend
        import torch
        assert resolve_backend("auto", torch.zeros(1)) == "torch"
        try:
            resolve_backend("triton", torch.zeros(1))
        except RuntimeError as e:
            assert "triton" in str(e)
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
