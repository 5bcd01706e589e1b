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
    tiny_llama_eager,
    tiny_qwen3_next,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_recorder import StreamRecorder
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache

from hf_fastattn.generation import MODES, JacobiDecoderOutput, jacobi_decoding, jacobi_generate
from hf_fastattn.generation.fastpath import rows_kernel_available
from hf_fastattn.generation.jacobi import build_draft
from hf_fastattn.generation.rollback import keep_path, needs_snapshot, rollback, snapshot
from hf_fastattn.generation.speculation import AcceptanceStats, ForwardCost, Tree, plan


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _both(model, ids, mask=None, mode="lookahead", block_size=None, jacobi_kwargs=None, **kwargs):
    """(greedy `generate`, Jacobi decoding's `JacobiDecoderOutput`) for the same inputs; `jacobi_kwargs` go to the
    latter only."""
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    jacobi = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        custom_generate=jacobi_decoding,
        return_dict_in_generate=True,
        mode=mode,
        block_size=block_size,
        **(jacobi_kwargs or {}),
        **kwargs,
    )
    return greedy, jacobi


def _cache_of(out):
    """The cache of a generate output (its field is `cache` from transformers 5.24, `past_key_values` before)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _forward(model, tokens, cache, **kwargs):
    """`model(tokens, cache)` under the cache argument's name in this transformers version."""
    from hf_fastattn.integration.cache import cache_argument

    return model(tokens, use_cache=True, **{cache_argument(model): cache}, **kwargs)


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


class _StopOnToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    near_bigram=st.booleans(),
    eager=st.booleans(),
    rows=rows_strategy,
    num_candidates=st.sampled_from([1, 2, 4, 8]),
    block_size=st.one_of(st.none(), st.integers(1, 9)),
    ngram_size=st.integers(2, 5),
    max_new_tokens=st.integers(1, 30),
    stop=st.sampled_from(["eos", "criterion", None]),
    stop_at=st.integers(0, 29),
)
def test_token_tree_matches_greedy(
    near_bigram, eager, rows, num_candidates, block_size, ngram_size, max_new_tokens, stop, stop_at
):
    """Lookahead's token trees (several candidates in one forward, a 4D mask, the accepted path gathered out of the
    K/V cache): sdpa and eager attention, padded batches, EOS or a custom stopping criterion (which, unlike EOS,
    keeps finished rows generating real tokens until all rows stop)."""
    model = tiny_llama_eager(near_bigram) if eager else (tiny_bigram_llama() if near_bigram else tiny_llama())
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=PAD)
    if stop is not None:
        plain = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)[0, ids.shape[1] :]
        token = int(plain[min(stop_at, len(plain) - 1)])
        if stop == "eos":
            kwargs["eos_token_id"] = token
        else:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnToken(token)])
    greedy, out = _both(
        model,
        ids,
        mask,
        mode="lookahead",
        block_size=block_size,
        jacobi_kwargs=dict(num_candidates=num_candidates, ngram_size=ngram_size),
        **kwargs,
    )
    assert out.sequences.tolist() == greedy.tolist()
    _check_accounting(out, ids.shape[1])


def test_trees_are_used_and_paths_gathered(monkeypatch):
    """On repetitive text lookahead builds real trees and sometimes accepts a branch other than the first (whose K/V
    entries must then be gathered out of the cache), and still matches greedy."""
    import hf_fastattn.generation.jacobi as jacobi

    calls = {"trees": 0, "gathers": 0}
    original_build, original_keep = jacobi.build_draft, jacobi.keep_path

    def counting_build(*args, **kwargs):
        draft = original_build(*args, **kwargs)
        calls["trees"] += draft.ancestors is not None
        return draft

    def counting_keep(*args, **kwargs):
        calls["gathers"] += 1
        return original_keep(*args, **kwargs)

    monkeypatch.setattr(jacobi, "build_draft", counting_build)
    monkeypatch.setattr(jacobi, "keep_path", counting_keep)
    model = tiny_bigram_llama()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12, 5, 17, 40], [9, 4, 9, 4, 22]])
    greedy, out = _both(
        model,
        ids,
        mask,
        max_new_tokens=60,
        pad_token_id=PAD,
        mode="lookahead",
        jacobi_kwargs=dict(num_candidates=6),
    )
    assert out.sequences.tolist() == greedy.tolist()
    assert calls["trees"] > 0 and calls["gathers"] > 0, calls


def test_build_draft_merges_shared_prefixes():
    draft = build_draft([[[7, 8, 9], [7, 8, 5], [6]], [[3]]], filler=[1, 2])
    assert draft.tokens.tolist() == [[7, 8, 9, 5, 6], [3, 2, 2, 2, 2]]  # row 1 padded with its filler token
    assert draft.parents == [[-1, 0, 1, 1, -1], [-1, -1, -1, -1, -1]]
    assert draft.depth.tolist() == [[1, 2, 3, 3, 1], [1, 1, 1, 1, 1]]
    assert draft.children[0] == {(-1, 7): 0, (0, 8): 1, (1, 9): 2, (1, 5): 3, (-1, 6): 4}
    assert draft.children[1] == {(-1, 3): 0}  # padding nodes are never followed
    ancestors = draft.ancestors[0].nonzero().tolist()
    assert ancestors == [[0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 3], [4, 4]]
    chain = build_draft([[[4, 5]], [[6]]], filler=[1, 2])
    assert chain.ancestors is None and chain.tokens.tolist() == [[4, 5], [6, 2]]


def test_keep_path_equals_feeding_only_the_accepted_tokens():
    model = tiny_llama()
    prompt, tree = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[10, 11, 12, 13]])  # nodes: 10 -> 11, 12 -> 13
    reference = DynamicCache(config=model.config)
    _forward(model, torch.tensor([[3, 4, 5, 6, 12, 13]]), reference)
    cache = DynamicCache(config=model.config)
    _forward(model, prompt, cache)
    blocked = torch.finfo(model.dtype).min
    allowed = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    mask = torch.zeros(1, 1, 4, 8, dtype=model.dtype)
    mask[0, 0, :, 4:] = torch.zeros(4, 4, dtype=model.dtype).masked_fill(~allowed, blocked)
    positions = torch.tensor([[4, 5, 4, 5]])
    _forward(model, tree, cache, attention_mask=mask, position_ids=positions)
    keep_path(cache, 4, [[2, 3]])
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)


def _cost(per_token: float) -> ForwardCost:
    """A fixed cost curve t(n) = 1 + per_token * (n - 1): marked calibrated, and deaf to the loop's own timings."""
    cost = ForwardCost()
    for n in (1, 2, 4, 8, 16, 32, 64):
        cost.record(n, 1.0 + per_token * (n - 1))
    cost.calibrated = True
    cost.record = lambda tokens, seconds: None
    return cost


def _tree(candidates, stats):
    tree = Tree()
    for tokens, source in candidates:
        tree.add(tokens, source, stats)
    return tree


def test_plan_guesses_only_what_pays_for_its_cost():
    """Expected tokens per second decides: sure guesses are all taken when extra tokens are nearly free, none when a
    guess that is rarely right would make the forward dearer; a tree keeps the likeliest nodes first."""
    stats = AcceptanceStats(prior={"text": 0.9, "jacobi": 0.05})
    sure, hopeless = ([5, 6, 7, 8], "text:3"), ([9, 9, 9], "jacobi")
    assert plan([_tree([sure], stats)], _cost(0.01), 1, 16) == [[0, 1, 2, 3]]
    assert plan([_tree([hopeless], stats)], _cost(0.2), 1, 16) == [[]]
    # expensive tokens: a sure guess still pays (0.9 extra tokens for 0.5 extra time), the fourth one (0.66) not
    assert plan([_tree([sure], stats)], _cost(0.5), 1, 16) == [[0, 1, 2]]
    tree = _tree([sure, ([5, 4], "jacobi"), hopeless], stats)  # nodes 0-3: 5 6 7 8; 4: the 4 under 5; 5-7: 9 9 9
    # by reach: the 4 under the sure 5 (0.9 x 0.075, a deeper guess has 1.5x the prior) beats the first 9 (0.05)
    assert plan([tree], _cost(0.0), 1, 5, force=5) == [[0, 1, 2, 3, 4]]
    assert plan([tree], _cost(0.0), 1, 16, chain_only=True) == [[0, 1, 2, 3]]
    # a batch shares one width: the expected tokens are the worst row's
    assert plan([_tree([sure], stats), _tree([hopeless], stats)], _cost(0.2), 1, 16) == [[], []]


def test_tree_stops_building_where_a_guess_is_nearly_sure_to_fail():
    """With `min_reach`, a candidate's tokens past the point where reaching them is less likely than that are not
    built (planning could gain at most that much from them); without it every token is a node."""
    stats = AcceptanceStats(prior={"jacobi": 0.05})
    block = list(range(10, 74))  # a Jacobi block of 64 guesses: reach 0.05, 0.05 * 0.075, ...
    full, cut = Tree(), Tree(min_reach=Tree.MIN_REACH)
    full.add(block, "jacobi", stats)
    cut.add(block, "jacobi", stats)
    assert len(full.tokens) == 64
    assert 1 <= len(cut.tokens) < 5 and cut.tokens == block[: len(cut.tokens)]
    assert all(r >= Tree.MIN_REACH for r in cut.reach[:-1]) and cut.reach[-1] < Tree.MIN_REACH
    cut.add([10, 11, 99], "text:4", AcceptanceStats())  # a likelier source lifts the shared nodes: its branch is built
    assert cut.tokens[-1] == 99 and cut.reach[-1] > 0.1


def test_acceptance_stats_learn_per_source_and_depth():
    stats = AcceptanceStats(prior={"text": 0.5}, strength=2.0)
    for _ in range(8):
        stats.update("text:3", 1, True)
        stats.update("text:3", 2, False)
    assert stats.p("text:3", 1) == pytest.approx(9 / 10)
    assert stats.p("text:3", 2) == pytest.approx(2 * 0.75 / 10)  # deeper guesses: a higher prior (1.5x)
    assert stats.p("text:3", 3) == stats.p("text:3", 2)  # depths 2-3 are pooled
    assert stats.p("text:1", 1) == pytest.approx(0.5)  # another source keeps its prior

    class Model:  # (any object: the counts are kept per model)
        pass

    model = Model()
    stats.merge_into_model(model)
    carried = AcceptanceStats.for_model(model, carried=4.0)  # the next call starts from them, capped at 4 tries
    assert carried.counts[("text:3", 1)] == [4.0, 4.0]
    assert carried.p("text:3", 1) == pytest.approx((4 + 1) / 6)
    assert AcceptanceStats.for_model(Model()).counts == {}


def test_forward_cost_interpolates_and_forgets_noise_slowly():
    cost = ForwardCost()
    cost.record(1, 1.0)
    cost.record(8, 2.0)
    assert cost(4) == pytest.approx(1.0 + 3 / 7)
    cost.record(1, 5.0)  # a noisy measurement barely moves the running minimum
    assert cost(1) < 1.2
    cost.record(1, 0.5)  # a faster one is believed at once
    assert cost(1) == 0.5
    assert cost(64) > cost(8)  # beyond the largest measured size: it keeps growing
    cost.record(6, 9.0)  # an outlier at a size measured once: a larger size was cheaper, so that counts
    assert cost(6) == pytest.approx(2.0)
    cost.computed_tokens = lambda n: 8 if 4 < n <= 8 else n  # (RowPlan.computed_tokens: sizes 5-7 padded to 8)
    cost.record(5, 7.0)  # a forward over 5 tokens computed 8: counted as one over 8
    assert cost(5) == cost(7) == cost(8) < 2.2 and cost(4) < cost(5)


def test_forward_cost_adds_the_loops_own_time_per_size():
    """The loop's time around a forward (a running mean per bucket, interpolated between) is part of a pass's
    cost: a guessing pass whose Python work outweighs its expected tokens is not planned."""
    cost = ForwardCost()
    cost.record(1, 1.0)
    cost.record(4, 1.0)
    assert cost(2) == pytest.approx(1.0)  # nothing measured around the forwards yet
    cost.record_overhead(1, 0.1)
    cost.record_overhead(4, 0.4)
    assert cost(1) == pytest.approx(1.1) and cost(4) == pytest.approx(1.4)
    assert cost(2) == pytest.approx(1.2) and cost(64) == pytest.approx(cost._interpolate(64) + 0.4)
    cost.record_overhead(4, 1.4)  # a running mean: one slow pass moves it by a tenth of the difference
    assert cost(4) == pytest.approx(1.0 + 0.4 + ForwardCost.OVERHEAD_WEIGHT * 1.0)
    stats = AcceptanceStats(prior={"text": 0.9})
    sure = _tree([([5, 6, 7, 8], "text:3")], stats)
    free = _cost(0.0)
    assert plan([sure], free, 1, 16) == [[0, 1, 2, 3]]
    free.record_overhead(1, 0.0)
    free.record_overhead(2, 5.0)  # verifying anything costs five forwards of bookkeeping
    assert plan([sure], free, 1, 16) == [[]]


def test_decoding_records_the_loops_own_time(monkeypatch):
    model = tiny_bigram_llama()
    cost = _cost(0.1)
    monkeypatch.setattr(ForwardCost, "for_model", classmethod(lambda cls, model, batch=1: cost))
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 5, 17]])
    greedy, out = _both(model, ids, None, mode="lookahead", max_new_tokens=12, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy.tolist()
    assert 1 in cost.overhead and all(0 < seconds < 1 for seconds in cost.overhead.values())


def test_jacobi_modes_stop_guessing_on_a_model_whose_guesses_fail(monkeypatch):
    """The random model's Jacobi guesses are nearly always wrong: with the cost model most passes guess nothing
    (plain greedy steps); adaptive=False keeps the textbook window (every remaining position at first). The cost
    curve is fixed (each fed token +10%: measured on a tiny model it is noise) and the model a fresh copy (no
    acceptance carried over from other tests)."""
    import copy

    monkeypatch.setattr(ForwardCost, "for_model", classmethod(lambda cls, model, batch=1: _cost(0.1)))
    model = copy.deepcopy(tiny_llama())
    ids = torch.tensor([[5, 17, 33, 8, 61, 12]])
    greedy = model.generate(ids, do_sample=False, max_new_tokens=60)
    for adaptive in (True, False):
        trace = []
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=60,
            custom_generate=jacobi_decoding,
            mode="jacobi",
            adaptive=adaptive,
            jacobi_trace=trace,
        )
        assert out.tolist() == greedy.tolist()
        guesses = [record["guesses"].shape[1] for record in trace]
        if adaptive:
            assert sum(g == 0 for g in guesses) > len(guesses) / 2, guesses
        else:
            assert guesses[0] == 59 and min(guesses[:-1]) > 0, guesses


def test_output_names_the_cache_without_deprecation_warning():
    import warnings

    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(
            torch.tensor([[3, 4, 5]]),
            do_sample=False,
            max_new_tokens=5,
            custom_generate=jacobi_decoding,
            return_dict_in_generate=True,
        )
    assert isinstance(_cache_of(out), DynamicCache) and out.num_forward_passes >= 1


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


@pytest.mark.parametrize("how", ["generate", "jacobi_generate"])
def test_streamer_receives_tokens_in_order(how):
    model = tiny_llama()
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 5, 17, 33]])
    reference, ours = StreamRecorder(), StreamRecorder()
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
        (dict(num_beams=2), "not beam search"),
        (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
        (dict(mode="newton"), "not a Jacobi decoding mode"),
        (dict(block_size=0), "block_size"),
    ],
    ids=["num_beams", "num_return_sequences", "bad_mode", "bad_block"],
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
    assert needs_snapshot(_cache_of(out))  # its linear-attention layers cannot simply be cropped


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
    _forward(model, torch.tensor([[3, 4, 5, 6]]), cache)
    assert needs_snapshot(cache)
    saved = snapshot(cache)
    before = [getattr(layer, "recurrent_states", {}).get(0) for layer in cache.layers]
    before = [b.clone() if b is not None else None for b in before]
    kv_before = cache.layers[1].keys.clone()
    _forward(model, torch.tensor([[7, 8, 9]]), cache)
    rollback(cache, 3, saved)
    assert torch.equal(cache.layers[0].recurrent_states[0], before[0])
    assert torch.equal(cache.layers[1].keys, kv_before)

    llama_cache = DynamicCache(config=tiny_llama().config)
    _forward(tiny_llama(), torch.tensor([[3, 4, 5, 6]]), llama_cache)
    assert not needs_snapshot(llama_cache)
    rollback(llama_cache, 3)
    assert llama_cache.get_seq_length() == 1


@pytest.mark.parametrize("mode", ["jacobi", "lookahead"])
def test_sliding_window_hybrid_recurrent_cache_matches_greedy(mode):
    """A converted LoLCATs-hybrid model decodes on a RecurrentCache holding a linear state and the last `window`
    keys/values; Jacobi's rollback (snapshot and restore) keeps both right."""
    from hf_fastattn import RecurrentCache
    from hf_fastattn.conversion import convert

    torch.manual_seed(0)
    model = convert(tiny_llama(), "t2r", feature_dim=16, hybrid=True, window=3)
    ids, mask = left_padded([[5, 9, 22, 31, 5, 9, 22], [40, 41]])
    greedy, out = _both(model, ids, mask, max_new_tokens=12, pad_token_id=PAD, mode=mode, block_size=4)
    assert out.sequences.tolist() == greedy.tolist()
    assert isinstance(_cache_of(out), RecurrentCache)


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_greedy_with_accepted_guesses(mode):
    """The exactness claim in the precision users run: float32 (the other tests use float64), on a model whose
    guesses are accepted, a batch of left-padded prompts. A block forward and a one-token forward differ by
    float32 rounding, so a near-tie of the top two logits could flip; peaky logits make that unlikely here, and the
    README says that exactness holds in exact arithmetic (bf16 can diverge, as transformers' own cached and
    uncached greedy can)."""
    import copy

    model = copy.deepcopy(tiny_bigram_llama()).float()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [40, 41, 9], [77, 3, 3, 21, 50]])
    greedy, out = _both(model, ids, mask, mode=mode, block_size=8, max_new_tokens=40, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy.tolist()
    _check_accounting(out, ids.shape[1])
    if mode == "lookahead":  # its n-gram guesses are accepted here (the Jacobi modes rest, as in float64)
        assert max(out.accepted_per_pass) > 1, out.accepted_per_pass


def test_first_call_measures_the_linear_routes_and_the_cost_curve_with_them(monkeypatch, tmp_path):
    """On a CPU model the first adaptive call times each size with each linear-layer route (`RowPlan.calibrate`),
    keeps the plan for later calls on the model and, through the cache folder, for other processes, and hands the
    cost curve the times of what it chose."""
    import copy

    from hf_fastattn.generation import fastpath
    from hf_fastattn.generation.fastpath import RowPlan

    monkeypatch.setenv("HF_FASTATTN_CACHE", str(tmp_path))
    model = copy.deepcopy(tiny_bigram_llama()).float()
    timed = []
    real = RowPlan.calibrate

    def recording(self, timed_forward, float32):
        effective = real(self, lambda k: timed.append((k, self.forced)) or timed_forward(k), float32)
        recording.effective = effective
        return effective

    monkeypatch.setattr(RowPlan, "calibrate", recording)
    recorded, record = [], ForwardCost.record
    monkeypatch.setattr(ForwardCost, "record", lambda self, k, s: recorded.append((k, s)) or record(self, k, s))
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 5, 17]])
    greedy, out = _both(model, ids, None, mode="lookahead", max_new_tokens=12, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy.tolist()
    plan = RowPlan.for_model(model, 1)
    assert plan.measured and set(plan.routes) == set(RowPlan.SIZES)
    routes = {None, "linear", "mm", "onednn"} | ({"rows"} if rows_kernel_available() else set())
    assert {route for _, route in timed} == routes  # (None: the untimed warm-up)
    assert {k for k, _ in timed} == set(RowPlan.SIZES)
    cost = ForwardCost.for_model(model, 1)
    assert cost.calibrated
    assert set(recording.effective.items()) <= set(recorded)
    timed.clear()
    _both(model, ids, None, mode="lookahead", max_new_tokens=4, pad_token_id=PAD)
    assert timed == []  # measured once per model, thread count and batch size
    # another process (nothing in memory): the saved plan and times are used, nothing is timed
    assert (tmp_path / "row_plans.json").exists()
    monkeypatch.setattr(fastpath, "_PLANS", type(fastpath._PLANS)())
    other = copy.deepcopy(model)
    recorded.clear()
    greedy, out = _both(other, ids, None, mode="lookahead", max_new_tokens=12, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy.tolist()
    assert timed == [] and RowPlan.for_model(other, 1).routes == plan.routes
    assert ForwardCost.for_model(other, 1).calibrated
    assert set(recording.effective.items()) <= set(recorded)
