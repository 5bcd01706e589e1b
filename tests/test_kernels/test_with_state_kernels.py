"""The families' state-in / state-out entry points with `backend="triton"`: the same sequence in pieces (several
tokens, one token by the recurrent step, the rest), the state passed along, equals the naive reference on the whole
sequence, with GQA and left padding; and the Triton branch was taken (the kernels' launches are counted)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_fastattn.ops.fast import fast_attention_with_state  # noqa: E402
from hf_fastattn.ops.linear import linear_attention_with_state  # noqa: E402
from hf_fastattn.ops.reference import naive_fast_attention, naive_linear_attention  # noqa: E402

from .helpers import DEVICE, randn  # noqa: E402

pytestmark = pytest.mark.triton

B, H, HKV, N, D = 2, 4, 2, 40, 16
PIECES = [(0, 23), (23, 24), (24, 40)]


def _data(hkv=HKV):
    torch.manual_seed(0)
    q, k, v = randn(B, H, N, D), randn(B, hkv, N, D), randn(B, hkv, N, D)
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[-1, :9] = False
    return q, k, v, mask


def _count_kernels(monkeypatch):
    import hf_fastattn.kernels as kernels

    calls = []
    for name in ("linear_attention_triton", "recurrent_linear_step_triton"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    return calls


def _in_pieces(fn, q, k, v, mask):
    outs, state = [], None
    for start, end in PIECES:
        out, state = fn(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask[:, start:end], state)
        outs.append(out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("hkv", [HKV, H], ids=["gqa", "mha"])
def test_linear_with_state_on_triton_in_pieces(hkv, monkeypatch):
    calls = _count_kernels(monkeypatch)
    q, k, v, mask = _data(hkv)
    out = _in_pieces(
        lambda q, k, v, m, s: linear_attention_with_state(
            q, k, v, padding_mask=m, initial_state=s, output_final_state=True, backend="triton"
        ),
        q,
        k,
        v,
        mask,
    )
    ref = naive_linear_attention(q, k, v, causal=True, feature_map="elu", padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    # the one-token step has its kernel for equal head counts; with GQA it falls back to PyTorch
    step = ["recurrent_linear_step_triton"] if hkv == H else []
    assert calls == ["linear_attention_triton", *step, "linear_attention_triton"]


@pytest.mark.parametrize("order", [1, 2])
def test_fast_with_state_on_triton_in_pieces(order, monkeypatch):
    calls = _count_kernels(monkeypatch)
    q, k, v, mask = _data()
    out = _in_pieces(
        lambda q, k, v, m, s: fast_attention_with_state(
            q,
            k,
            v,
            causal=True,
            order=order,
            padding_mask=m,
            initial_state=s,
            output_final_state=True,
            backend="triton",
        ),
        q,
        k,
        v,
        mask,
    )
    ref = naive_fast_attention(q, k, v, causal=True, order=order, padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    assert calls == ["linear_attention_triton", "linear_attention_triton"]
