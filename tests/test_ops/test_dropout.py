"""Attention dropout (issue 14, item 6): "sparse" drops normalized weights exactly as sdpa does, "linear" and "fast"
drop keys for every query (`hf_fastattn.ops.dropout`), and models in training mode really get it.

The masks are read back with one-hot values: with v = I (value j is the unit vector e_j), output i is row i of the
attention weights after dropout, so it shows which weights were dropped and how the kept ones were scaled. The same
seed then draws the same mask for other values, which gives an exact reference for outputs and gradients.
"""

import pytest
import torch
from tiny_models import tiny_model

import hf_fastattn
from hf_fastattn.ops import fast_attention, linear_attention, sparse_attention
from hf_fastattn.ops.dropout import key_dropout
from hf_fastattn.ops.reference import (
    naive_fast_attention,
    naive_linear_attention,
    naive_sparse_attention,
    repeat_kv,
)

P = 0.3


def one_hot_values(b, hkv, n):
    return torch.eye(n).expand(b, hkv, n, n).contiguous()


def draw(fn, v, seed):
    torch.manual_seed(seed)
    return fn(v)


SPARSE = [
    pytest.param(dict(pattern="strided", stride=8, local=3), id="strided"),
    pytest.param(dict(pattern="fixed", stride=10, summary=3), id="fixed"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pattern", SPARSE)
def test_sparse_dropout_drops_each_normalized_weight_like_sdpa(pattern, causal):
    b, h, n = 2, 4, 40
    q, k = torch.randn(b, h, n, 8), torch.randn(b, 2, n, 8)
    weights = naive_sparse_attention(q, k, one_hot_values(b, 2, n), causal=causal, **pattern)  # [B, H, N, N]
    dropped = draw(lambda v: sparse_attention(q, k, v, causal=causal, dropout_p=P, **pattern), one_hot_values(b, 2, n), 5)
    allowed = weights > 0
    kept = dropped != 0
    assert not (kept & ~allowed).any()  # nothing outside the pattern appears
    torch.testing.assert_close(dropped[kept] * (1 - P), weights[kept])  # kept weights are scaled by 1 / (1 - p)
    rate = 1 - kept.sum().item() / allowed.sum().item()
    assert abs(rate - P) < 0.06, rate  # ~2000 allowed weights: the binomial spread is ~0.01
    # one draw per weight, as sdpa: some key is kept for one query and dropped for another
    assert ((kept & allowed).any(2) & (~kept & allowed).any(2)).any()
    # the same seed draws the same mask for any values: outputs and gradients equal the reference with that mask
    v = torch.randn(b, 2, n, 6, requires_grad=True)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = draw(lambda v: sparse_attention(qg, kg, v, causal=causal, dropout_p=P, **pattern), v, 5)
    rq, rk = q.clone().requires_grad_(), k.clone().requires_grad_()
    rw = naive_sparse_attention(rq, rk, one_hot_values(b, 2, n), causal=causal, **pattern)
    ref = (rw * kept / (1 - P)) @ repeat_kv(v, h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    cot = torch.randn(out.shape)
    grads = torch.autograd.grad((out * cot).sum(), (qg, kg, v))
    ref_grads = torch.autograd.grad((ref * cot).sum(), (rq, rk, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-3)


def test_sparse_dropout_on_decoding_rows():
    """Queries at the last positions only (a K/V cache) drop their weights too."""
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 30, 8)
    spec = dict(pattern="strided", stride=4, causal=True)
    full_q = torch.cat([torch.randn(1, 2, 27, 8), q], 2)
    weights = naive_sparse_attention(full_q, k, one_hot_values(1, 2, 30), **spec)[:, :, -3:]
    dropped = draw(lambda v: sparse_attention(q, k, v, dropout_p=0.5, **spec), one_hot_values(1, 2, 30), 2)
    kept = dropped != 0
    assert kept.any() and (~kept & (weights > 0)).any()
    torch.testing.assert_close(dropped[kept] * 0.5, weights[kept])


def linear_op(causal):
    return (
        lambda q, k, v, **kw: linear_attention(q, k, v, causal=causal, **kw),
        lambda q, k, v: naive_linear_attention(q, k, v, causal=causal),
    )


def fast_op(causal):
    return (
        lambda q, k, v, **kw: fast_attention(q, k, v, causal=causal, order=2, **kw),
        lambda q, k, v: naive_fast_attention(q, k, v, causal=causal, order=2),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("make_op", [linear_op, fast_op], ids=["linear", "fast"])
def test_linear_and_fast_dropout_drops_keys_for_every_query(make_op, causal):
    op, naive = make_op(causal)
    b, h, hkv, n = 2, 4, 2, 150
    q, k = torch.randn(b, h, n, 8), torch.randn(b, hkv, n, 8)
    weights = naive(q, k, one_hot_values(b, hkv, n))  # normalized weights [B, H, N, N]
    dropped = draw(lambda v: op(q, k, v, dropout_p=P), one_hot_values(b, hkv, n), 7)
    kept = dropped != 0
    allowed = weights > 0
    assert not (kept & ~allowed).any()
    torch.testing.assert_close(dropped[kept] * (1 - P), weights[kept], atol=1e-6, rtol=1e-4)
    # key j is kept or dropped for every query i and every query head of its K/V group
    key_kept = kept.any(2)  # [B, H, N]
    assert torch.equal(kept, key_kept[:, :, None, :] & allowed)
    grouped = key_kept.view(b, hkv, h // hkv, n)
    assert torch.equal(grouped, grouped[:, :, :1].expand_as(grouped))
    rate = 1 - grouped[:, :, 0].float().mean().item()
    assert abs(rate - P) < 0.07, rate  # 600 draws: the binomial spread is ~0.02
    # and with the same seed, other values: outputs and gradients equal the reference on the dropped values
    v = torch.randn(b, hkv, n, 6, requires_grad=True)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = draw(lambda v: op(qg, kg, v, dropout_p=P), v, 7)
    rq, rk = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = naive(rq, rk, v * grouped[:, :, 0, :, None] / (1 - P))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    cot = torch.randn(out.shape)
    grads = torch.autograd.grad((out * cot).sum(), (qg, kg, v))
    ref_grads = torch.autograd.grad((ref * cot).sum(), (rq, rk, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=2e-4, rtol=2e-3)


def test_key_dropout_zero_is_identity_and_bad_p_is_refused():
    v = torch.randn(1, 2, 5, 4)
    assert key_dropout(v, 0.0) is v
    assert key_dropout(v, 1.0).abs().max() == 0
    q = torch.randn(1, 2, 5, 4)
    for bad in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"attention dropout must be a probability in \[0, 1\]"):
            linear_attention(q, q, v, causal=True, dropout_p=bad)
        with pytest.raises(ValueError, match=r"attention dropout must be a probability in \[0, 1\]"):
            sparse_attention(q, q, v, causal=True, stride=2, dropout_p=bad)


# --------------------------------------------------------------------------------------------------------------
# models: the attention dropout of the config reaches the attention in training mode, and only there

ATTN_DROPOUT = {
    "gpt2": dict(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
    "bert": dict(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0),
    "llama": dict(attention_dropout=0.5),
}
NO_DROPOUT = {
    "gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "bert": dict(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0),
    "llama": dict(attention_dropout=0.0),
}


def _model(family, impl, dropout):
    torch.manual_seed(0)
    model = tiny_model(family, attn_implementation=impl, **(ATTN_DROPOUT if dropout else NO_DROPOUT)[family])
    if impl == "sparse":
        hf_fastattn.configure(model, stride=4, local=2)
    return model


def _forward(model, family, ids, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out = model(input_ids=ids)
    return out.last_hidden_state if family == "bert" else out.logits


@pytest.mark.parametrize("impl", ["linear", "fast", "sparse"])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_model_attention_dropout_applies_in_training_only(family, impl):
    ids = torch.randint(3, 96, (2, 20))
    model, plain = _model(family, impl, dropout=True), _model(family, impl, dropout=False)
    with torch.no_grad():
        # eval: unaffected, the model without attention dropout gives the same numbers
        evaluated = _forward(model, family, ids)
        torch.testing.assert_close(evaluated, _forward(plain, family, ids))
        model.train()
        plain.train()
        # training without attention dropout (and no other dropout) is eval: any change below is attention dropout
        torch.testing.assert_close(_forward(plain, family, ids, seed=1), evaluated)
        first = _forward(model, family, ids, seed=1)
        assert not torch.allclose(first, evaluated, atol=1e-3)
        torch.testing.assert_close(_forward(model, family, ids, seed=1), first)  # the seed decides the mask
        assert not torch.allclose(_forward(model, family, ids, seed=2), first, atol=1e-3)
    loss = _forward(model, family, ids, seed=3).square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
