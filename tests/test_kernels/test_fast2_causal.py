"""`kernels.fast2_causal`: the CPU kernel for causal FAST attention of order 2 without autograd, against the naive
quadratic reference (`ops.reference.naive_fast_attention`)."""

from __future__ import annotations

import os

import pytest
import torch

from hf_fastattn.kernels import fast2_causal as module
from hf_fastattn.ops.reference import naive_fast_attention

AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def test_builds_where_avx512_is():
    """On an AVX-512 CPU (this project's machines) the kernel must build: a silent fallback to the torch path would
    hide a broken build."""
    if os.environ.get("HF_FASTATTN_CPU_KERNELS", "1") == "0":
        assert not module.available()
    else:
        assert module.available() == AVX512


needs_kernel = pytest.mark.skipif(not AVX512, reason="the kernel needs AVX-512 (checked above)")


@needs_kernel
@pytest.mark.parametrize(
    "b,h,hkv,n,d,dv,chunk",
    [
        (2, 4, 4, 63, 32, 32, 16),  # several chunks, a partial last one
        (2, 4, 2, 260, 32, 24, 128),  # grouped K/V heads (one state per K/V head), Dv != D
        (1, 3, 1, 129, 64, 64, 128),  # one K/V head for three query heads, D = 64 (F = 2145)
        (1, 2, 2, 1, 16, 16, 128),  # one token
        (1, 2, 2, 40, 8, 8, 256),  # chunk longer than the sequence
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_matches_naive_reference(b, h, hkv, n, d, dv, chunk, temperature, padded):
    torch.manual_seed(n + d)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, dv)
    mask = None
    if padded:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[-1, : n // 3] = False
    out = module.fast2_causal(q, k, v, temperature=temperature, key_mask=mask, chunk=chunk)
    ref = naive_fast_attention(q, k, v, causal=True, order=2, temperature=temperature, padding_mask=mask)
    assert out.dtype == torch.float32 and out.shape == (b, h, n, dv)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


@needs_kernel
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
def test_state_carries_over_a_split(hkv):
    """A sequence cut in three, each piece starting from the state the one before left: the same output as the
    whole, equal to the reference; the state equals its direct sums (count, sum k_hat, sum k_hat k_hat^T, and
    sum phi(k_hat) v^T over the keys' features [1, k_hat, k_hat_a k_hat_b for a <= b])."""
    from hf_fastattn.ops.common import fast_normalize

    torch.manual_seed(1)
    b, h, n, d, dv = 2, 2, 90, 8, 12
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, dv)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :25] = False
    state = module.new_state(b, hkv, d, dv)
    pieces = []
    for lo, hi in ((0, 30), (30, 31), (31, 90)):
        pieces.append(
            module.fast2_causal(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], temperature=0.7,
                                key_mask=mask[:, lo:hi], chunk=16, state=state)  # fmt: skip
        )
    ref = naive_fast_attention(q, k, v, causal=True, order=2, temperature=0.7, padding_mask=mask)
    torch.testing.assert_close(torch.cat(pieces, 2), ref, atol=2e-5, rtol=2e-4)
    kh = fast_normalize(k) * mask[:, None, :, None]
    rows, cols = torch.triu_indices(d, d)
    feats = torch.cat([mask[:, None, :, None].float().expand(b, hkv, n, 1), kh, kh[..., rows] * kh[..., cols]], -1)
    for got, want in zip(state, (feats.transpose(-1, -2) @ v, kh.sum(2), kh.transpose(-1, -2) @ kh, mask.sum(1).float()[:, None].expand(b, hkv))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_writes_into_the_given_buffer_and_takes_16_bit_inputs():
    q, k, v = (torch.randn(1, 2, 50, 16).bfloat16() for _ in range(3))
    buf = torch.full((1, 2, 50, 16), float("nan"))
    out = module.fast2_causal(q, k, v, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    ref = naive_fast_attention(q.float(), k.float(), v.float(), causal=True, order=2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


@needs_kernel
def test_bad_shapes_name_what_was_expected():
    q, v = torch.randn(1, 4, 10, 8), torch.randn(1, 3, 10, 8)
    with pytest.raises(RuntimeError, match=r"k must be \[B, Hkv, N, D\] with Hkv dividing H"):
        module.fast2_causal(q, torch.randn(1, 3, 10, 8), v)
    with pytest.raises(RuntimeError, match=r"v must be \[B, Hkv, N, Dv\]"):
        module.fast2_causal(q, torch.randn(1, 2, 10, 8), v)
    with pytest.raises(RuntimeError, match="4-d CPU tensors"):
        module.fast2_causal(q[0], q[0], q[0])


@needs_kernel
def test_registered_as_a_torch_operator():
    """The kernel is the custom op `hf_fastattn::fast2_causal_cpu` (schema and fake tensor checked by
    `torch.library.opcheck`)."""
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    keep = torch.ones(1, 20)
    keep[0, :3] = 0
    empty = torch.empty(0)
    for state in ((empty,) * 4, module.new_state(1, 1, 8, 8)):
        args = (q, k, v, keep, torch.empty(1, 2, 20, 8), *state, 1.3, 8)
        torch.library.opcheck(module._fast2_causal_op, args, test_utils=("test_schema", "test_faketensor"))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(module._EXTENSION, "_tried", False)
    monkeypatch.setattr(module._EXTENSION, "_module", None)
    monkeypatch.setenv("HF_FASTATTN_CPU_KERNELS", "0")
    assert not module.available()
    q = torch.randn(1, 2, 4, 8)
    assert not module.supports(q, q, q)
    with pytest.raises(RuntimeError, match="not available"):
        module.fast2_causal(q, q, q)


@needs_kernel
def test_a_state_of_the_wrong_shape_is_refused():
    from hf_fastattn.ops.fast import fast_attention_with_state

    q = torch.randn(1, 2, 5, 8)
    bad = (torch.zeros(1, 2, 44, 8), torch.zeros(1, 2, 44))  # F = 1 + 8 + 36 = 45 for D = 8
    with pytest.raises(ValueError, match=r"initial_state must be \(S \[1, 2, 45, 8\], z \[1, 2, 45\]\)"):
        fast_attention_with_state(q, q, q, causal=True, initial_state=bad)


@needs_kernel
@pytest.mark.parametrize(
    "b,h,hkv,d,dv,temperature",
    [(2, 4, 2, 16, 12, 0.7), (1, 3, 1, 32, 32, 1.0), (1, 2, 2, 8, 64, 1.0), (2, 4, 2, 8, 64, 0.8), (1, 3, 1, 16, 64, 1.2),
     (1, 4, 1, 8, 64, 1.0)],  # fmt: skip
    ids=["generic", "generic-gqa", "dv64-g1", "dv64-g2", "dv64-g3", "dv64-g4-generic"],
)
def test_step_equals_the_torch_step(b, h, hkv, d, dv, temperature):
    """`fast2_step_` on FastmaxFeatureMap's state against the features and `recurrent_linear_step_` over three steps
    (a padded new key in the second), outputs and the state updated in place; the register path for 64-wide values
    and 1-3 query heads per K/V head, and the generic loop."""
    from hf_fastattn.ops import FastmaxFeatureMap, recurrent_linear_step_
    from hf_fastattn.ops.common import fast_normalize

    torch.manual_seed(2)
    phi = FastmaxFeatureMap(2, temperature)
    f = phi.feature_dim(d)
    s, z = torch.rand(b, hkv, f, dv), torch.rand(b, hkv, f) + 1
    ours, ref_state = (s.clone(), z.clone()), (s.clone(), z.clone())
    for step in range(3):
        q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, dv)
        mask = None
        if step == 1:
            mask = torch.ones(b, 1, dtype=torch.bool)
            mask[0] = False
        kf = phi(fast_normalize(k))
        if mask is not None:
            kf = kf * mask[:, None, :, None]
        ref = recurrent_linear_step_(phi(fast_normalize(q)), kf, v, ref_state)
        out = module.fast2_step_(q, k, v, ours, temperature=temperature, key_mask=mask)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
        for got, want in zip(ours, ref_state):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="one token"):
        module.fast2_step_(torch.randn(b, h, 2, d), torch.randn(b, hkv, 2, d), torch.randn(b, hkv, 2, dv), ours)
    args = (q, k, v, torch.empty(0), *ours, torch.empty(b, h, 1, dv), temperature)
    torch.library.opcheck(module._fast2_step_op, args, test_utils=("test_schema", "test_faketensor"))


@needs_kernel
def test_eager_calls_bypass_the_operator_and_compiled_ones_keep_it(monkeypatch):
    """In eager mode the wrappers call the built function directly (`CpuExtension.call`: the operator's Python
    dispatch costs ~30 us a decoding step) and bump the version counters of what they write, as the operator does;
    under `torch.compile` the graph holds the operator, with the same result."""
    assert module.available()
    calls, real = [], module._EXTENSION._module

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(module._EXTENSION, "_module", Spy())
    d = 8
    s, z = torch.rand(1, 2, 45, d), torch.rand(1, 2, 45) + 1
    versions = (s._version, z._version)
    q, k, v = (torch.randn(1, 2, 1, d) for _ in range(3))
    eager_state = (s.clone(), z.clone())
    eager = module.fast2_step_(q, k, v, (s, z))
    assert calls == ["fast2_step"]
    assert s._version > versions[0] and z._version > versions[1]

    def step(q, k, v, s, z):
        return module.fast2_step_(q, k, v, (s, z))

    calls.clear()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, *eager_state)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager_state[0], s)
    assert "fast2_step" in calls  # run by the operator's implementation inside the graph, not by the eager branch
