"""Backend choice for the operators: "torch" (any device) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1).

Triton reads `TRITON_INTERPRET` when a kernel is decorated with `triton.jit` (triton 3.9: `knobs.runtime.interpret`
is read from the environment on every access, and `triton.jit` picks the interpreter if it is set at that moment).
Our kernels are therefore decorated lazily, per mode, at their first launch (`_jit.lazy_jit`). Triton's own library
functions (tl.sum, tl.cdiv, ...) are decorated when triton is first imported, so the interpreter works only if
`TRITON_INTERPRET=1` was already set then (torch and transformers may import triton early): set it in the
environment before Python starts. `resolve_backend` says so rather than letting a kernel fail mid-launch.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "HF_FASTATTN_BACKEND"
_TRUE = ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` succeeds (cached: the answer does not change within a process)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether `TRITON_INTERPRET` is set to a true value now (read like triton's own knob)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _validate(backend, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Pick "torch" or "triton" for an operator call on `tensors`.

    Args:
        backend: "auto" | "torch" | "triton". The environment variable `HF_FASTATTN_BACKEND`, when set and non-empty,
            overrides it (same values).
        tensors: the operator's inputs; their device decides "auto".

    Returns:
        "torch" or "triton". "auto" gives "triton" iff all tensors are on CUDA and triton imports.

    Raises:
        ValueError: an unknown backend (argument or environment).
        RuntimeError: "triton" forced where it cannot run: triton not importable, or CPU tensors without
            `TRITON_INTERPRET=1`.
    """
    _validate(backend, "backend")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        backend = _validate(env, f"${ENV_VAR}")
    if backend == "torch":
        return "torch"
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the `triton` package, which cannot be imported here; "
            "install triton or use backend='torch'"
        )
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only in Triton's interpreter: set the environment variable "
            "TRITON_INTERPRET=1 (slow, for testing), move the tensors to CUDA, or use backend='torch'"
        )
    if not on_cuda and not interpreter_ready():
        raise RuntimeError(
            "backend='triton' on CPU tensors: TRITON_INTERPRET=1 is set now, but triton was imported before it was "
            "set, so triton's own library (tl.sum, tl.cdiv, ...) is compiled-mode and the interpreter cannot run the "
            "kernels. Set TRITON_INTERPRET=1 in the environment before starting Python, or use backend='torch'"
        )
    if not on_cuda and (reason := interpreter_loop_error()):
        raise RuntimeError(f"backend='triton' on CPU tensors: {reason}")
    return "triton"


@functools.cache
def interpreter_loop_error() -> str | None:
    """None where Triton's interpreter runs a loop with a run-time bound (every kernel here has one), else why not.

    Triton 3.6's interpreter turns a loop bound into an int with `int()` of a one-element array, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.9's runs it. Checked once per
    process, on a two-step kernel, in interpreter mode only.
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _count(x_ptr, n):
        for i in range(0, n):
            tl.store(x_ptr + i, i + 1.0)

    x = torch.zeros(2)
    try:
        _count[(1,)](x, 2)
    except Exception as exc:  # the interpreter wraps the numpy error in its own InterpreterError
        return (
            f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound under numpy "
            f"{numpy.__version__} ({exc}), and every kernel here has one. Triton 3.9's interpreter runs them: "
            "upgrade triton, or use backend='torch'"
        )
    if x.tolist() != [1.0, 2.0]:
        return f"Triton {triton.__version__}'s interpreter ran a two-step loop wrong here (got {x.tolist()}): use backend='torch'"
    return None


def interpreter_ready() -> bool:
    """Whether triton was imported in interpreter mode (its standard library then runs in the interpreter).

    Triton decorates its own `@triton.jit` library functions when it is first imported, choosing compiled or
    interpreted mode from `TRITON_INTERPRET` at that moment; our kernels are decorated lazily, theirs are not.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "interpreter_enabled",
    "interpreter_loop_error",
    "interpreter_ready",
    "resolve_backend",
    "triton_available",
]
