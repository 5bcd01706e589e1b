"""A CPU kernel for causal FAST attention of order 2 without autograd (`csrc/fast2_causal.cpp`), compiled on first use.

`fast2_causal(q, k, v, ...)` is the algorithm of `ops.fast._causal_order2_inference` (chunks, the order-2 state read
with the queries' features, D-dimensional denominators), one (batch, K/V head) per thread with a chunk's features
built in one pass into that thread's buffers and the products on torch's GEMM, instead of a Python loop of batched
torch calls over all heads. Built by `cpu_build.CpuExtension`: not offered without AVX-512, when the build fails or
when `HF_FASTATTN_CPU_KERNELS=0`; `ops.fast` then keeps its torch path.
"""

from __future__ import annotations

import torch

from .cpu_build import CpuExtension

_EXTENSION = CpuExtension("hf_fastattn_fast2_causal", "fast2_causal.cpp")


@torch.library.custom_op(
    "hf_fastattn::fast2_causal_cpu", mutates_args=("out", "state", "key_sum", "key_outer", "count"), device_types="cpu"
)
def _fast2_causal_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    out: torch.Tensor,
    state: torch.Tensor,
    key_sum: torch.Tensor,
    key_outer: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    chunk: int,
) -> None:
    """The C++ kernel as a torch operator (so `torch.compile` keeps it in its graph): writes `out` and the state
    (empty tensors: none) in place."""
    _EXTENSION.load().fast2_causal(q, k, v, keep, out, state, key_sum, key_outer, count, temperature, chunk)


@_fast2_causal_op.register_fake
def _(q, k, v, keep, out, state, key_sum, key_outer, count, temperature, chunk):
    return None


def available() -> bool:
    """Whether the kernel can run here (compiling it now if needed)."""
    return _EXTENSION.load() is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these inputs fit the kernel (4-d CPU tensors; converted to float32) and it is available here."""
    return all(x.device.type == "cpu" and x.dim() == 4 for x in (q, k, v)) and available()


def fast2_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    temperature: float = 1.0,
    key_mask: torch.Tensor | None = None,
    chunk: int = 128,
    out: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal fastmax of order 2, without autograd.

    Args:
        q: `[B, H, N, D]`. k: `[B, Hkv, N, D]`. v: `[B, Hkv, N, Dv]`; Hkv divides H. Raw (normalized here).
        temperature: T > 0 dividing q_hat . k_hat.
        key_mask: `[B, N]` bool, True for real tokens; padded keys get weight 0.
        chunk: tokens per chunk.
        out: a `[B, H, N, Dv]` float32 buffer for the output (e.g. on huge pages, `ops.memory`).
        state: `(S [B, Hkv, F, Dv], key_sum [B, Hkv, D], key_outer [B, Hkv, D, D], count [B, Hkv])`, contiguous
            float32, the keys before position 0 (sum phi(k_hat) v^T over the keys' features [1, k_hat, k_hat_a
            k_hat_b for a <= b], F = 1 + D + D(D+1)/2; sum k_hat; sum k_hat k_hat^T; the number of keys), updated
            in place to the state after the last token (`new_state` makes an empty one).

    Returns:
        `[B, H, N, Dv]` float32.

    Raises:
        RuntimeError: the kernel is not available here, or the inputs do not fit it (`supports`).
    """
    if not available():
        raise RuntimeError("fast2_causal: the CPU kernel is not available here (see hf_fastattn.kernels.fast2_causal)")
    if not supports(q, k, v):
        raise RuntimeError(
            "fast2_causal: expected 4-d CPU tensors q [B, H, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], got "
            f"{tuple(q.shape)} {q.device}, {tuple(k.shape)} {k.device}, {tuple(v.shape)} {v.device}"
        )
    b, h, n, _ = q.shape
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    keep = q.new_empty(0, 0) if key_mask is None else key_mask.to(torch.float32).contiguous()
    if out is None:
        out = q.new_empty(b, h, n, v.shape[-1])
    if state is None:
        state = (q.new_empty(0),) * 4
    elif not all(x.dtype == torch.float32 and x.is_contiguous() for x in state):
        raise ValueError("fast2_causal: the state must be four contiguous float32 tensors (see `new_state`)")
    args = (q, k, v, keep, out, *state, float(temperature), int(chunk))
    _EXTENSION.call(_fast2_causal_op, "fast2_causal", *args, mutated=(out, *state))
    return out


def new_state(b: int, hkv: int, d: int, dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state of no keys: `(S [b, hkv, F, dv], key_sum [b, hkv, d], key_outer [b, hkv, d, d], count [b, hkv])`."""
    f = 1 + d + d * (d + 1) // 2
    return torch.zeros(b, hkv, f, dv), torch.zeros(b, hkv, d), torch.zeros(b, hkv, d, d), torch.zeros(b, hkv)


@torch.library.custom_op("hf_fastattn::fast2_step_cpu", mutates_args=("state", "key_sum", "out"), device_types="cpu")
def _fast2_step_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    state: torch.Tensor,
    key_sum: torch.Tensor,
    out: torch.Tensor,
    temperature: float,
) -> None:
    """The decoding step as a torch operator: updates (S, z) and writes `out` in place."""
    _EXTENSION.load().fast2_step(q, k, v, keep, state, key_sum, out, temperature)


@_fast2_step_op.register_fake
def _(q, k, v, keep, state, key_sum, out, temperature):
    return None


def fast2_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 1.0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step of causal fastmax of order 2 on `FastmaxFeatureMap`'s state, updated in place: the new key
    and value folded into (S, z), then the new query read against them, each row of S read and written once.

    Args:
        q: `[B, H, 1, D]`. k: `[B, Hkv, 1, D]`. v: `[B, Hkv, 1, Dv]`; raw (normalized here); Hkv divides H.
        state: `(S [B, Hkv, F, Dv], z [B, Hkv, F])` contiguous float32 over `FastmaxFeatureMap(2, temperature)`'s
            features of the normalized keys, F = 1 + D + D(D+1)/2 (`ops.linear.state_updatable_in_place`).
        temperature: T > 0.
        key_mask: `[B, 1]` or `[B]` bool, False for a padded new key (then it does not enter the state).

    Returns:
        `[B, H, 1, Dv]` float32.
    """
    if not supports(q, k, v):
        if not available():
            raise RuntimeError("fast2_step_: the CPU kernel is not available here (see hf_fastattn.kernels.fast2_causal)")
        raise RuntimeError(
            f"fast2_step_: expected 4-d CPU tensors q, k, v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return step_unchecked(q, k, v, state, temperature, key_mask)


_NO_KEEP = torch.empty(0)  # the kernel's "no key mask" (never written)


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def step_unchecked(q, k, v, state, temperature, key_mask) -> torch.Tensor:
    """`fast2_step_` on inputs `supports` accepted (the decoding loop's call: a step is ~75 us of kernel at 8 heads
    of 64, so each microsecond of Python shows)."""
    q, k, v = _as_float32(q), _as_float32(k), _as_float32(v)
    keep = _NO_KEEP if key_mask is None else key_mask.reshape(-1).to(torch.float32).contiguous()
    out = q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])
    args = (q, k, v, keep, state[0], state[1], out, float(temperature))
    _EXTENSION.call(_fast2_step_op, "fast2_step", *args, mutated=(state[0], state[1], out))
    return out
