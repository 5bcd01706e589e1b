"""Jacobi decoding returns exactly `generate(do_sample=False)`, token for token, in every mode."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import (
    PAD,
    left_padded,
    tiny_bigram_llama,
    tiny_bigram_qwen3_next,
    tiny_llama,
    tiny_qwen3_next,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from hf_fastattn.generation import MODES, JacobiDecoderOutput, jacobi_decoding, jacobi_generate
from hf_fastattn.generation.rollback import needs_snapshot, rollback, snapshot



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _both(model, ids, mask=None, mode="lookahead", block_size=None, **kwargs):
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    jacobi = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        custom_generate=jacobi_decoding,
        return_dict_in_generate=True,
        mode=mode,
        block_size=block_size,
        **kwargs,
    )
    return greedy, jacobi


def _check_accounting(out: JacobiDecoderOutput, prompt_len: int):
    assert out.num_forward_passes == len(out.accepted_per_pass)
    assert sum(out.accepted_per_pass) == out.sequences.shape[1] - prompt_len
    # never more forwards than greedy's one per token (recurrent caches aside: they re-feed accepted tokens)
    assert out.num_forward_passes <= out.sequences.shape[1] - prompt_len


rows_strategy = st.lists(st.lists(st.integers(3, 95), min_size=1, max_size=8), min_size=1, max_size=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    near_bigram=st.booleans(),
    rows=rows_strategy,
    mode=st.sampled_from(MODES),
    block_size=st.one_of(st.none(), st.integers(1, 9)),
    max_new_tokens=st.integers(1, 24),
    min_new_tokens=st.integers(0, 6),
    eos_at=st.one_of(st.none(), st.integers(0, 23)),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.3]),
)
def test_matches_greedy(
    near_bigram, rows, mode, block_size, max_new_tokens, min_new_tokens, eos_at, repetition_penalty
):
    """Random prompts, batch 1 to 3 left-padded, every mode, EOS / max_new_tokens / min_new_tokens / pad_token_id.

    `near_bigram` picks a model whose text repeats, so that guesses are accepted (several tokens per forward).
    """
    model = tiny_bigram_llama() if near_bigram else tiny_llama()
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=PAD, repetition_penalty=repetition_penalty)
    if eos_at is not None:
        # an EOS that really occurs: a token of the unconstrained greedy output
        plain = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)[0, ids.shape[1] :]
        kwargs["eos_token_id"] = int(plain[min(eos_at, len(plain) - 1)])
        kwargs["min_new_tokens"] = min_new_tokens
    greedy, out = _both(model, ids, mask, mode=mode, block_size=block_size, **kwargs)
    assert out.sequences.tolist() == greedy.tolist()
    _check_accounting(out, ids.shape[1])


@pytest.mark.parametrize("mode", MODES)
def test_repetitive_text_accepts_guesses(mode):
    """A model whose greedy text repeats: guesses get accepted (several tokens per forward), output unchanged."""
    model = tiny_bigram_llama()
    ids = torch.tensor([[5, 17, 33, 8, 61, 12]])
    greedy, out = _both(model, ids, max_new_tokens=40, mode=mode, block_size=8)
    assert out.sequences.tolist() == greedy.tolist()
    _check_accounting(out, ids.shape[1])
    if mode == "lookahead":
        assert out.num_forward_passes < 0.8 * 40, out.accepted_per_pass


class _StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("mode", MODES)
def test_custom_stopping_criteria(mode):
    model = tiny_llama()
    ids, mask = left_padded([[4, 9, 11, 30], [7, 7]])
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=PAD)
    token = int(plain[0, ids.shape[1] + 6])
    criteria = StoppingCriteriaList([_StopOnToken(token)])
    greedy, out = _both(
        model, ids, mask, max_new_tokens=20, pad_token_id=PAD, stopping_criteria=criteria, mode=mode
    )
    assert out.sequences.tolist() == greedy.tolist()
    assert out.sequences.shape[1] < ids.shape[1] + 20  # the criterion did stop generation early


class _Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("how", ["generate", "jacobi_generate"])
def test_streamer_receives_tokens_in_order(how):
    model = tiny_llama()
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 5, 17, 33]])
    reference, ours = _Recorder(), _Recorder()
    model.generate(ids, do_sample=False, max_new_tokens=15, streamer=reference)
    if how == "generate":
        model.generate(
            ids, do_sample=False, max_new_tokens=15, streamer=ours, custom_generate=jacobi_decoding
        )
    else:
        jacobi_generate(model, ids, do_sample=False, max_new_tokens=15, streamer=ours)
    assert ours.chunks == reference.chunks and ours.ended


def test_plain_tensor_output_and_direct_call():
    model = tiny_llama()
    ids = torch.tensor([[3, 4, 5]])
    greedy = model.generate(ids, do_sample=False, max_new_tokens=9)
    assert torch.equal(
        model.generate(ids, do_sample=False, max_new_tokens=9, custom_generate=jacobi_decoding), greedy
    )
    assert torch.equal(jacobi_decoding(model, ids, max_new_tokens=9, do_sample=False, mode="hybrid"), greedy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True), "greedy-only"),
        (dict(num_beams=2), "greedy-only"),
        (dict(mode="newton"), "not a Jacobi decoding mode"),
        (dict(block_size=0), "block_size"),
    ],
    ids=["do_sample", "num_beams", "bad_mode", "bad_block"],
)
def test_bad_input_is_refused(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=4, custom_generate=jacobi_decoding, **kwargs)


def test_model_that_cannot_generate_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="not applicable"):
        jacobi_decoding(bert, torch.tensor([[3, 4]]), max_new_tokens=4)


# --- caches that cannot be cropped (recurrent state) ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gs_jacobi", "lookahead"])
def test_recurrent_cache_matches_greedy(mode):
    model = tiny_qwen3_next()
    ids, mask = left_padded([[5, 9, 22, 31, 5, 9, 22], [40, 41]])
    greedy, out = _both(model, ids, mask, max_new_tokens=12, pad_token_id=PAD, mode=mode, block_size=4)
    assert out.sequences.tolist() == greedy.tolist()
    assert any(not layer.is_croppable for layer in out.past_key_values.layers)


def test_recurrent_cache_with_accepted_guesses():
    """Guesses that are partly right exercise both branches: keep the state, or restore it and re-feed."""
    model = tiny_bigram_qwen3_next()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [9, 4]])
    greedy, out = _both(model, ids, mask, max_new_tokens=30, pad_token_id=PAD, mode="lookahead", block_size=6)
    assert out.sequences.tolist() == greedy.tolist()
    assert max(out.accepted_per_pass) > 1


def test_rollback_restores_recurrent_state_and_crops_kv():
    model = tiny_qwen3_next()
    cache = DynamicCache(config=model.config)
    model(torch.tensor([[3, 4, 5, 6]]), past_key_values=cache, use_cache=True)
    assert needs_snapshot(cache)
    saved = snapshot(cache)
    before = [getattr(layer, "recurrent_states", {}).get(0) for layer in cache.layers]
    before = [b.clone() if b is not None else None for b in before]
    kv_before = cache.layers[1].keys.clone()
    model(torch.tensor([[7, 8, 9]]), past_key_values=cache, use_cache=True)
    rollback(cache, 3, saved)
    assert torch.equal(cache.layers[0].recurrent_states[0], before[0])
    assert torch.equal(cache.layers[1].keys, kv_before)

    llama_cache = DynamicCache(config=tiny_llama().config)
    tiny_llama()(torch.tensor([[3, 4, 5, 6]]), past_key_values=llama_cache, use_cache=True)
    assert not needs_snapshot(llama_cache)
    rollback(llama_cache, 3)
    assert llama_cache.get_seq_length() == 1
