"""A CPU kernel for the chunked causal products of linear attention (`csrc/chunk_linear.cpp`), compiled on first use.

`chunk_products(a, b, c, ...)` computes out_i = sum_{j <= i} (a_i . b_j) c_j (j >= i with `reverse`) for float32
`[BH, N, F]` a, b and `[BH, N, E]` c, chunk by chunk with a carried state, as `ops.linear_cpu._chunk_products` does
with batched matmuls, but one (batch, head) row per thread with a chunk's work in cache and the products in
AVX-512 register tiles (several times faster at N = 16K: `hf-fastattn bench attention`). `map="elu"` applies
elu(x) + 1 to a and b as each chunk is read. Widths that are not multiples of 16 are zero-padded (a copy). Built by `cpu_build.CpuExtension`: not offered without AVX-512, when the build fails or when
`HF_FASTATTN_CPU_KERNELS=0`.
"""

from __future__ import annotations

import torch

from .cpu_build import CpuExtension

_EXTENSION = CpuExtension("hf_fastattn_chunk_linear", "chunk_linear.cpp")
MAPS = (None, "elu")


@torch.library.custom_op(
    "hf_fastattn::chunk_products_cpu", mutates_args=("out", "den", "state", "key_sum"), device_types="cpu"
)
def _chunk_products_op(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    row_a: torch.Tensor,
    row_b: torch.Tensor,
    elu_grad_at: torch.Tensor,
    out: torch.Tensor,
    den: torch.Tensor,
    state: torch.Tensor,
    key_sum: torch.Tensor,
    reverse: bool,
    ones: bool,
    normalize: bool,
    map_ab: bool,
    map_c: bool,
    eps: float,
) -> None:
    """The C++ kernel as a torch operator (so `torch.compile` keeps it in its graph): writes out, den, and the
    state (S, z) in place; empty tensors for what is not given."""
    _EXTENSION.load().chunk_products(
        a, b, c, row_a, row_b, elu_grad_at, out, den, state, key_sum, reverse, ones, normalize, map_ab, map_c, eps
    )


@_chunk_products_op.register_fake
def _(a, b, c, row_a, row_b, elu_grad_at, out, den, state, key_sum, reverse, ones, normalize, map_ab, map_c, eps):
    return None


def available() -> bool:
    """Whether the kernel can run here (compiling it now if needed)."""
    return _EXTENSION.load() is not None


def supports(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether these inputs fit the kernel (3-d float32 CPU tensors) and it is available here."""
    return all(x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 for x in (a, b, c)) and available()


def _pad_to_16(x: torch.Tensor) -> torch.Tensor:
    """x with zero columns appended up to a multiple of 16 (zero features add nothing to a . b)."""
    pad = -x.shape[-1] % 16
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def chunk_products(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    reverse: bool = False,
    ones: bool = False,
    normalize: bool = False,
    map: str | None = None,
    state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    out: torch.Tensor | None = None,
    eps: float = 1e-6,
    row_a: torch.Tensor | None = None,
    row_b: torch.Tensor | None = None,
    map_c: bool = False,
    elu_grad_at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The causal products, without autograd.

    Args:
        a, b: `[BH, N, F]` float32 (features, or inputs of the map). c: `[BH, N, E]`.
        reverse: sum over j >= i instead of j <= i.
        ones: also the denominators den_i = sum_j a_i . b_j (the products with a column of ones after c).
        normalize: return out_i / max(den_i, eps) (with `ones`).
        map: None, or "elu" for elu(x) + 1 applied to a and b.
        state: `(S [BH, F, E], z [BH, F] or None)`, the sums of b_j c_j^T and b_j before the first position (after
            the last when reverse); not modified.
        out: a `[BH, N, E]` float32 buffer for the output (e.g. on huge pages, `ops.memory`).
        row_a, row_b: `[BH, N]` terms added to the weights, a_i . b_j + row_a_i + row_b_j (the products with a
            column [row_a | 1] after a and [1 | row_b] after b, which the kernel appends in its chunk copies);
            no `state` with them.
        map_c: apply elu(x) + 1 to c (whatever `map` is).
        elu_grad_at: `[BH, N, E]` x: the output multiplied by elu's derivative at x (e^min(x, 0)), the backward of
            the feature map applied as the output is written.

    Returns:
        `(out, den [BH, N] or None, S, z or None)`, S and z the state at the other end.

    Raises:
        RuntimeError: the kernel is not available here, or the inputs do not fit it (`supports`).
    """
    if _EXTENSION.load() is None:
        raise RuntimeError("chunk_products: the CPU kernel is not available here (see hf_fastattn.kernels.chunk_linear)")
    if map not in MAPS:
        raise ValueError(f"chunk_products: map must be one of {MAPS}, got {map!r}")
    if not supports(a, b, c) or a.shape != b.shape or c.shape[:2] != a.shape[:2]:
        raise RuntimeError(
            "chunk_products: expected float32 CPU tensors a, b [BH, N, F] and c [BH, N, E], got "
            f"{tuple(a.shape)} {a.dtype} {a.device}, {tuple(b.shape)}, {tuple(c.shape)} {c.dtype} {c.device}"
        )
    bh, n, f = a.shape
    e = c.shape[-1]
    if (map == "elu" and f % 16) or (map_c and e % 16):
        raise ValueError(f"chunk_products: the elu map needs widths that are multiples of 16, got F={f}, E={e}")
    if elu_grad_at is not None and (tuple(elu_grad_at.shape) != (bh, n, e) or e % 16):
        raise ValueError(f"chunk_products: elu_grad_at must be [BH, N, E] = {(bh, n, e)} with E a multiple of 16")
    rows = [a.new_empty(0, 0) if r is None else r.float().contiguous() for r in (row_a, row_b)]
    extra = 16 if row_a is not None or row_b is not None else 0
    if extra and state is not None:
        raise ValueError("chunk_products: row_a / row_b cannot be combined with a state")
    a, b, c = (_pad_to_16(x).contiguous() for x in (a, b, c))
    fp, ep = a.shape[-1] + extra, c.shape[-1]
    padded_out = out if out is not None and ep == e else torch.empty(bh, n, ep, dtype=torch.float32)
    s = a.new_zeros(bh, fp, ep)
    z = a.new_zeros(bh, fp) if ones else a.new_empty(0, 0)
    if state is not None:
        s[:, :f, :e] = state[0]
        if ones and state[1] is not None:
            z[:, :f] = state[1]
    den = a.new_empty(bh, n) if ones else a.new_empty(0, 0)
    dx = a.new_empty(0, 0, 0) if elu_grad_at is None else elu_grad_at.float().contiguous()
    args = (a, b, c, *rows, dx, padded_out, den, s, z, reverse, ones, normalize, map == "elu", map_c, eps)
    _EXTENSION.call(_chunk_products_op, "chunk_products", *args, mutated=(padded_out, den, s, z))
    if ep != e:
        result = padded_out[..., :e]
        out = result if out is None else out.copy_(result)
    else:
        out = padded_out
    return out, (den if ones else None), s[:, :f, :e], (z[:, :f] if ones else None)
