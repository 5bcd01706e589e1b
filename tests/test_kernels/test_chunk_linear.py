"""`kernels.chunk_linear`: the CPU kernel for the chunked causal products of linear attention, against a naive
quadratic computation (and the final state against its direct sum)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hf_fastattn.kernels import chunk_linear as module

AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def test_builds_where_avx512_is():
    """On an AVX-512 CPU (this project's machines) the kernel must build: a silent fallback to the torch path would
    hide a broken build."""
    if os.environ.get("HF_FASTATTN_CPU_KERNELS", "1") == "0":
        assert not module.available()
    else:
        assert module.available() == AVX512


needs_kernel = pytest.mark.skipif(not AVX512, reason="the kernel needs AVX-512 (checked above)")


def naive(a, b, c, *, reverse, ones, normalize, state):
    """out_i = sum over allowed j of (a_i . b_j) c_j (+ a_i . S0), den_i likewise with ones (+ a_i . z0)."""
    n = a.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed = allowed.triu() if reverse else allowed.tril()
    w = (a @ b.transpose(1, 2)) * allowed
    out = w @ c
    s = b.transpose(1, 2) @ c
    z = b.sum(1)
    if state is not None:
        out = out + a @ state[0]
        s = s + state[0]
        if ones:
            z = z + state[1]
    den = w.sum(-1) + (a @ state[1].unsqueeze(-1)).squeeze(-1) if ones and state is not None else w.sum(-1)
    if normalize:
        out = out / den.clamp_min(1e-6).unsqueeze(-1)
    return out, den, s, z


def close(x, ref):
    """fp32 sums of up to a few thousand products: within 1e-5 of the reference's largest magnitude."""
    torch.testing.assert_close(x, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 130, 257])
@pytest.mark.parametrize("widths", [(64, 64), (16, 32), (65, 64), (32, 17)], ids=lambda w: f"F{w[0]}-E{w[1]}")
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_naive_products(n, widths, reverse, threads):
    f, e = widths
    gen = torch.Generator().manual_seed(n * 7 + f)
    a, b = torch.rand(3, n, f, generator=gen), torch.rand(3, n, f, generator=gen)
    c = torch.randn(3, n, e, generator=gen)
    state = (torch.rand(3, f, e, generator=gen), torch.rand(3, f, generator=gen))
    before = threads, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ones, normalize, start in [(False, False, None), (True, False, state), (True, True, state), (True, True, None)]:
            out, den, s, z = module.chunk_products(a, b, c, reverse=reverse, ones=ones, normalize=normalize, state=start)
            ref = naive(a, b, c, reverse=reverse, ones=ones, normalize=normalize, state=start)
            close(out, ref[0])
            close(s, ref[2])
            if ones:
                close(den, ref[1])
                close(z, ref[3])
            else:
                assert den is None and z is None
    finally:
        torch.set_num_threads(before[1])
    assert state[0].sum() > 0  # the state passed in is not modified: compared against a fresh naive sum above


@needs_kernel
@pytest.mark.parametrize("n", [1, 64, 100])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_elu_map_inside_the_kernel(n, reverse):
    """map="elu": elu(x) + 1 of a and b computed in the kernel (its own exp) equals mapping them first."""
    a, b, c = torch.randn(2, n, 32) * 3, torch.randn(2, n, 32) * 3, torch.randn(2, n, 48)
    out = module.chunk_products(a, b, c, reverse=reverse, ones=True, normalize=True, map="elu")[0]
    ref = naive(F.elu(a) + 1, F.elu(b) + 1, c, reverse=reverse, ones=True, normalize=True, state=None)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("n", [1, 64, 150])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
@pytest.mark.parametrize("terms", ["a", "b", "ab"])
def test_row_terms(n, reverse, terms):
    """row_a / row_b: weights a_i . b_j + row_a_i + row_b_j (what the backward of linear attention uses for the
    denominators' column), against the naive products of those weights."""
    gen = torch.Generator().manual_seed(n)
    a, b, c = torch.randn(2, n, 16, generator=gen), torch.randn(2, n, 16, generator=gen), torch.randn(2, n, 32, generator=gen)
    ra = torch.randn(2, n, generator=gen) if "a" in terms else None
    rb = torch.randn(2, n, generator=gen) if "b" in terms else None
    out = module.chunk_products(a, b, c, reverse=reverse, row_a=ra, row_b=rb)[0]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed = allowed.triu() if reverse else allowed.tril()
    w = a @ b.transpose(1, 2) + (0 if ra is None else ra[:, :, None]) + (0 if rb is None else rb[:, None, :])
    close(out, (w * allowed) @ c)
    with pytest.raises(ValueError, match="cannot be combined with a state"):
        module.chunk_products(a, b, c, row_a=torch.zeros(2, n), state=(torch.zeros(2, 16, 32), None))


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_elu_on_c_and_elu_derivative_on_the_output(reverse):
    """map_c maps c inside the kernel; elu_grad_at multiplies the output by elu's derivative there (autograd's)."""
    a, b, c, at = torch.rand(2, 90, 16), torch.rand(2, 90, 16), torch.randn(2, 90, 32) * 2, torch.randn(2, 90, 32) * 2
    x = at.clone().requires_grad_(True)
    (derivative,) = torch.autograd.grad(F.elu(x).sum(), x)
    out = module.chunk_products(a, b, c, reverse=reverse, map_c=True, elu_grad_at=at)[0]
    ref = naive(a, b, F.elu(c) + 1, reverse=reverse, ones=False, normalize=False, state=None)[0] * derivative
    close(out, ref)


@needs_kernel
def test_out_buffer_and_bad_inputs():
    a, b, c = torch.rand(2, 10, 16), torch.rand(2, 10, 16), torch.randn(2, 10, 16)
    buffer = torch.empty(2, 10, 16)
    out = module.chunk_products(a, b, c, out=buffer)[0]
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out, naive(a, b, c, reverse=False, ones=False, normalize=False, state=None)[0])
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        module.chunk_products(a.double(), b.double(), c.double())
    with pytest.raises(RuntimeError, match=r"a, b \[BH, N, F\] and c \[BH, N, E\]"):
        module.chunk_products(a, b[:, :5], c)
    with pytest.raises(ValueError, match="map must be one of"):
        module.chunk_products(a, b, c, map="relu")
    with pytest.raises(ValueError, match="multiples of 16"):
        module.chunk_products(a[..., :15], b[..., :15], c, map="elu")
    with pytest.raises(ValueError, match="multiples of 16"):
        module.chunk_products(a, b, c[..., :15], map_c=True)
    with pytest.raises(ValueError, match=r"elu_grad_at must be \[BH, N, E\]"):
        module.chunk_products(a, b, c, elu_grad_at=c[:, :5])


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(module._EXTENSION, "_tried", False)
    monkeypatch.setattr(module._EXTENSION, "_module", None)
    monkeypatch.setenv("HF_FASTATTN_CPU_KERNELS", "0")
    assert not module.available()
    a = torch.rand(1, 4, 16)
    assert not module.supports(a, a, a)
    with pytest.raises(RuntimeError, match="not available"):
        module.chunk_products(a, a, a)


@needs_kernel
def test_registered_as_a_torch_operator():
    """The kernel is the custom op `hf_fastattn::chunk_products_cpu` (schema, fake tensor and autograd registration
    checked by `torch.library.opcheck`), so `torch.compile` keeps it in its graph: a compiled linear attention,
    forward and backward, equals eager."""
    from hf_fastattn.ops import linear_attention

    n = 70
    a, b, c = torch.rand(2, n, 16), torch.rand(2, n, 16), torch.randn(2, n, 32)
    args = (a, b, c, torch.rand(2, n), torch.empty(0, 0), torch.empty(0, 0, 0), torch.empty(2, n, 32),
            torch.empty(2, n), torch.zeros(2, 32, 32), torch.zeros(2, 32), False, True, True, False, False, 1e-6)  # fmt: skip
    torch.library.opcheck(module._chunk_products_op, args)
    q, k, v = (torch.randn(1, 2, 90, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, causal=True))
    out = compiled(q, k, v)
    (grads,) = [torch.autograd.grad(out.sum(), (q, k, v))]
    ref = linear_attention(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
