"""Every causal-LM family of the installed transformers that the compatibility rule accepts, as a tiny model
(`families.py`): "linear" and "fast" are causal, padding-invariant and decode on a constant-size RecurrentCache
exactly as the full forward computes; "sparse" with a pattern that covers every key equals sdpa.

Float64 models; the O(N) operators keep their states in float32 (the registry casts q and k), so the comparisons
allow 1e-5 absolute (float32 round-off over a few hundred operations on values of order one, observed up to 4e-6);
a wrong mask, position or state gives differences of order 1e-3 to 1e-1.
"""

import inspect

import pytest
import torch

import hf_fastattn
from hf_fastattn.integration.cache import RecurrentCache, cache_argument

from .families import VOCAB, accepted, tiny_model

N, PREFIX, PAD = 12, 7, 3
TOL = dict(atol=1e-5, rtol=1e-4)
LINEAR_FAMILIES = accepted("linear")
SPARSE_FAMILIES = accepted("sparse")
_MODELS = {}


def _model(family):
    """One tiny float64 model per family for the whole module (the tests switch its implementation)."""
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _ids(batch=2, n=N, seed=0):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids, mask=None, offset=0, **kwargs):
    """Logits, with positions that count real tokens (left padding: see the README's "RoPE and left padding"),
    given explicitly to every model that takes them, so that padded and unpadded forwards agree on them (RoBERTa
    would otherwise count from its padding index, OPT from the mask)."""
    if "position_ids" in inspect.signature(model.forward).parameters:
        real = torch.ones_like(ids) if mask is None else mask
        kwargs["position_ids"] = offset + (real.cumsum(-1) - 1).clamp(min=0)
    return model(ids, attention_mask=mask, **kwargs).logits


def test_at_least_25_causal_families_are_accepted():
    assert len(LINEAR_FAMILIES) >= 25, LINEAR_FAMILIES
    # what the former allowlist refused, and the families of the issue: sliding windows, local/global layers, MoE
    for family in ("gemma", "gemma2", "gemma3_text", "cohere2", "phi3", "olmo2", "gpt_neox", "mixtral", "qwen2_moe",
                   "qwen3_moe", "gpt_oss", "starcoder2", "opt"):
        assert family in LINEAR_FAMILIES, family


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
@pytest.mark.parametrize("impl", ["linear", "fast"])
def test_linear_and_fast_are_causal_padding_invariant_and_decode_recurrently(family, impl):
    model = _model(family)
    ids = _ids()
    with torch.no_grad():
        model.set_attn_implementation("eager")
        softmax = _forward(model, ids, use_cache=False)
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        full = _forward(model, ids, use_cache=False)
        assert not torch.allclose(full, softmax, atol=1e-6)  # the swap took place

        # causality: changing the last tokens leaves the earlier outputs as they were
        changed = ids.clone()
        changed[:, PREFIX:] = _ids(seed=1)[:, PREFIX:]
        torch.testing.assert_close(_forward(model, changed, use_cache=False)[:, :PREFIX], full[:, :PREFIX], **TOL)

        # padding: row 1 left-padded by PAD tokens gives the outputs of its unpadded forward
        padded = torch.cat([torch.zeros(2, PAD, dtype=ids.dtype), ids], dim=1)
        mask = torch.ones_like(padded)
        mask[1, :PAD] = 0
        padded[0, :PAD] = _ids(1, PAD, seed=2)  # row 0: PAD real tokens more, as a batch would hold
        out = _forward(model, padded, mask, use_cache=False)
        torch.testing.assert_close(out[1, PAD:], full[1], **TOL)

        # cached decoding: prefill, then one token at a time, on a RecurrentCache whose size never changes
        cache = RecurrentCache(model)
        arg = cache_argument(model)
        steps = [_forward(model, ids[:, :PREFIX], use_cache=True, **{arg: cache})]
        sizes = []
        for i in range(PREFIX, N):
            steps.append(_forward(model, ids[:, i : i + 1], offset=i, use_cache=True, **{arg: cache}))
            sizes.append(cache.nbytes())
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
        assert sizes[0] > 0 and len(set(sizes)) == 1, sizes
        assert cache.get_seq_length() == N


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_generate_uses_the_recurrent_cache_and_equals_no_cache(family):
    """generate picks a RecurrentCache by itself; greedy tokens and scores equal use_cache=False (left padding)."""
    model = _model(family)
    model.set_attn_implementation("linear")
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    common = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **common)
        plain = model.generate(ids, use_cache=False, **common)
    assert isinstance(getattr(cached, "cache", None) or cached.past_key_values, RecurrentCache)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(plain.scores), **TOL)


@pytest.mark.parametrize("family", SPARSE_FAMILIES)
def test_covering_sparse_equals_sdpa(family):
    """"sparse" whose pattern covers every key is softmax attention: equal to sdpa, padding included. The tiny
    configs of the sliding-window families have a window of 8 < 12 tokens, longer than every test sequence here
    (local band = stride = 16 >= N), so the window does not cut in (see the test below for what it does)."""
    model = _model(family)
    hf_fastattn.configure(model, pattern="strided", stride=16, local=16)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa" if type(model)._supports_sdpa else "eager")
        reference = _forward(model, ids, mask, use_cache=False)
        model.set_attn_implementation("sparse")
        out = _forward(model, ids, mask, use_cache=False)
    torch.testing.assert_close(out[0], reference[0], **TOL)
    torch.testing.assert_close(out[1, 2:], reference[1, 2:], **TOL)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "starcoder2"])
def test_sliding_window_is_replaced_by_the_pattern(family):
    """On sliding-window layers hf_fastattn's attention replaces the window: "sparse" covering attends to every key,
    as sdpa does in the same model without a window; sdpa with the window (8 < 12 tokens) differs."""
    model = _model(family)
    hf_fastattn.configure(model, pattern="strided", stride=16, local=16)
    ids = _ids(1, N)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        windowed = _forward(model, ids, use_cache=False)
        model.set_attn_implementation("sparse")
        out = _forward(model, ids, use_cache=False)
        model.set_attn_implementation("sdpa")
        window = model.config.sliding_window
        model.config.sliding_window = N  # the window now covers the sequence
        try:
            unwindowed = _forward(model, ids, use_cache=False)
        finally:
            model.config.sliding_window = window
    torch.testing.assert_close(out, unwindowed, **TOL)
    assert not torch.allclose(out[:, 8:], windowed[:, 8:], atol=1e-4)
