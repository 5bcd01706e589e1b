"""Triton linear-attention kernels (chunked causal / bidirectional, recurrent step) vs the naive reference, fp32 /
bf16 / fp16, feature and value sizes 16 to 150 (64: a real head size)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.kernels import linear_attention_triton, recurrent_linear_step_triton  # noqa: E402
from hf_fastattn.ops.linear import chunk_linear_attention, linear_attention, recurrent_linear_step  # noqa: E402
from hf_fastattn.ops.reference import naive_feature_attention, naive_linear_attention  # noqa: E402

from .helpers import (  # noqa: E402
    DEVICE,
    LENGTHS,
    assert_bf16_close,
    assert_close_all,
    assert_fp16_close,
    leaves,
    rand,
    randn,
)

pytestmark = pytest.mark.triton


def features(b, h, n, f, dv):
    qf = rand(b, h, n, f) + 0.1
    kf = rand(b, h, n, f) + 0.1
    v = randn(b, h, n, dv)
    return qf, kf, v


def state(b, h, f, dv):
    return randn(b, h, f, dv), rand(b, h, f) * 5


def kernel_fn(causal):
    def fn(qf, kf, v, s0=None, z0=None):
        init = None if s0 is None else (s0, z0)
        out, (s, z) = linear_attention_triton(
            qf, kf, v, causal=causal, initial_state=init, output_final_state=True
        )
        return out, s, z

    return fn


def reference_fn(causal):
    def fn(qf, kf, v, s0=None, z0=None):
        init = None if s0 is None else (s0, z0)
        out, (s, z) = naive_feature_attention(qf, kf, v, causal=causal, initial_state=init)
        return out, s, z

    return fn


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "initial_state"])
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_fp32_outputs_grads_states(causal, n, with_state):
    b, h, f, dv = 2, 2, 24, 16
    tensors = list(features(b, h, n, f, dv))
    if with_state:
        tensors += list(state(b, h, f, dv))
    assert_close_all(kernel_fn(causal), reference_fn(causal), tensors)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_many_feature_blocks_and_value_blocks(causal):
    # F = 150 spans three 64-wide feature blocks, Dv = 80 two value blocks
    tensors = [*features(1, 2, 70, 150, 80), *state(1, 2, 150, 80)]
    assert_close_all(kernel_fn(causal), reference_fn(causal), tensors, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_head_dim_64(causal):
    """Features and values of a real head size (F = Dv = 64: one full feature and value block each)."""
    tensors = [*features(1, 2, 100, 64, 64), *state(1, 2, 64, 64)]
    assert_close_all(kernel_fn(causal), reference_fn(causal), tensors, atol=2e-5)


@pytest.mark.parametrize("n", [1, 63], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_bf16_within_twice_reference_error(causal, n):
    tensors = [*features(2, 2, n, 16, 16), *state(2, 2, 16, 16)]
    assert_bf16_close(kernel_fn(causal), reference_fn(causal), tensors)


@pytest.mark.parametrize("f", [16, 64], ids=lambda f: f"f{f}")
@pytest.mark.parametrize("n", [1, 63], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_fp16_within_twice_reference_error(causal, n, f):
    tensors = [*features(1, 2, n, f, f), *state(1, 2, f, f)]
    assert_fp16_close(kernel_fn(causal), reference_fn(causal), tensors)


def test_chunks_carry_state():
    """Two calls chained through the returned state equal one call over the whole sequence."""
    qf, kf, v = features(1, 2, 100, 16, 16)
    full, full_state = linear_attention_triton(qf, kf, v, causal=True, output_final_state=True)
    a, st = linear_attention_triton(
        qf[:, :, :37], kf[:, :, :37], v[:, :, :37], causal=True, output_final_state=True
    )
    b, st = linear_attention_triton(
        qf[:, :, 37:], kf[:, :, 37:], v[:, :, 37:], causal=True, initial_state=st, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([a, b], 2), full)
    for x, y in zip(st, full_state):
        torch.testing.assert_close(x, y)


def test_no_state_returned_unless_asked():
    qf, kf, v = features(1, 2, 5, 16, 16)
    assert linear_attention_triton(qf, kf, v, causal=True)[1] is None


@pytest.mark.parametrize("f", [16, 150], ids=["f16", "f150"])
def test_recurrent_step_matches_reference_and_chunks(f):
    b, h, n, dv = 2, 2, 9, 16
    qf, kf, v = features(b, h, n, f, dv)
    s0, z0 = state(b, h, f, dv)
    ref, (rs, rz) = naive_feature_attention(qf, kf, v, causal=True, initial_state=(s0, z0))
    st = (s0, z0)
    outs = []
    for t in range(n):
        old = (st[0].clone(), st[1].clone())
        out, new = recurrent_linear_step_triton(
            qf[:, :, t : t + 1], kf[:, :, t : t + 1], v[:, :, t : t + 1], st
        )
        torch.testing.assert_close(st[0], old[0])  # the old state is not modified
        outs.append(out)
        st = new
    torch.testing.assert_close(torch.cat(outs, 2), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st[0], rs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st[1], rz, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("f", [16, 64], ids=lambda f: f"f{f}")
def test_recurrent_step_16bit(f, dtype):
    qf, kf, v = (x.to(dtype) for x in features(1, 2, 1, f, f))
    s0, z0 = state(1, 2, f, f)
    out, _ = recurrent_linear_step_triton(qf, kf, v, (s0, z0))
    ref, _ = naive_feature_attention(qf.float(), kf.float(), v.float(), causal=True, initial_state=(s0, z0))
    assert out.dtype == dtype
    # the inputs are the 16-bit numbers themselves: what is left is the rounding of the output (8 / 11 bits)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_operator_backend_triton_gqa_state(causal):
    """`chunk_linear_attention(backend="triton")` with Hkv < H equals the PyTorch form, state included."""
    qf = rand(2, 4, 40, 16)
    kf, v = rand(2, 2, 40, 16), randn(2, 2, 40, 16)
    init = (randn(2, 2, 16, 16), rand(2, 2, 16))
    kw = dict(causal=causal, initial_state=init, output_final_state=True)
    out, st = chunk_linear_attention(qf, kf, v, backend="triton", **kw)
    ref, rst = chunk_linear_attention(qf, kf, v, backend="torch", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for x, y in zip(st, rst):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    step, _ = recurrent_linear_step(qf[:, :, :1], kf[:, :, :1], v[:, :, :1], init, backend="triton")
    step_ref, _ = recurrent_linear_step(qf[:, :, :1], kf[:, :, :1], v[:, :, :1], init, backend="torch")
    torch.testing.assert_close(step, step_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_attention_backend_triton_with_padding(causal):
    q, k, v = (randn(2, 2, 33, 16) for _ in range(3))
    mask = torch.ones(2, 33, dtype=torch.bool, device=DEVICE)
    mask[1, :5] = False
    out = linear_attention(q, k, v, causal=causal, padding_mask=mask, backend="triton")
    ref = naive_linear_attention(q, k, v, causal=causal, padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bad_inputs_name_the_limit():
    qf, kf, v = features(1, 2, 4, 16, 16)
    with pytest.raises(TypeError, match="dtypes"):
        linear_attention_triton(qf.double(), kf.double(), v.double(), causal=True)
    with pytest.raises(ValueError, match="same heads"):
        linear_attention_triton(qf, kf[:, :1], v[:, :1], causal=True)
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_triton(qf, kf, v, causal=True, initial_state=state(1, 2, 8, 16))
    with pytest.raises(ValueError, match="one token"):
        recurrent_linear_step_triton(qf, kf, v, state(1, 2, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_backward_scans_take_the_forward_precision(dtype, monkeypatch):
    """The backward's three scans pick their tl.dot precision as the forward did: tf32 (tensor cores) for 16-bit
    inputs, exact fp32 for fp32 ones. An fp32 gradient fed to them as is made every product "ieee", which on an H100
    made the backward 30-120x slower than the forward (stop 42)."""
    from hf_fastattn.kernels import linear_attn

    picked = []

    def recording(*tensors):
        picked.append(real(*tensors))
        return picked[-1]

    real = linear_attn.dot_precision
    monkeypatch.setattr(linear_attn, "dot_precision", recording)
    qf, kf, v = leaves(features(1, 2, 20, 16, 16), dtype)
    out = linear_attention_triton(qf, kf, v, causal=True)[0]
    assert len(picked) == 1
    out.float().pow(2).sum().backward()  # the gradient reaching the kernel is fp32 (the division runs in fp32)
    expected = "ieee" if dtype == torch.float32 else "tf32"
    assert picked == [expected] * 4, picked
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (qf, kf, v))
