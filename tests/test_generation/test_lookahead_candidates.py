"""Lookahead's candidates: copies ranked and labelled by their full suffix-match length, alternatives (a node below a
parent that already has a more trusted child) learned apart, copies that start after a guessed token; whatever they
propose, the output stays greedy decoding's."""

from __future__ import annotations

import copy

import pytest
import torch
from gen_helpers import PAD, left_padded, tiny_bigram_llama

from hf_fastattn.generation import jacobi as jacobi_module
from hf_fastattn.generation import jacobi_decoding
from hf_fastattn.generation.guessers import Guesser, LookaheadGuesser, SuffixIndex, match_bucket
from hf_fastattn.generation.speculation import ALT, AcceptanceStats, Tree


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _naive_match(text: list[int], end: int, limit: int = 32) -> int:
    """The reference: the longest m <= limit with text[end - m : end] == text[-m:] (and end < len(text))."""
    best = 0
    for m in range(1, min(limit, end) + 1):
        if text[end - m : end] == text[len(text) - m :]:
            best = m
        else:
            break
    return best


def test_continuations_rank_by_the_full_match_length():
    # "1 2 3" occurs twice before the end: first after "8 9 7" (the text ends "8 9 7 1 2 3": a 6-token match),
    # then, more recently, after "5 5 5" (a 3-token match); the index only keys 3-grams
    text = [8, 9, 7, 1, 2, 3, 40, 41, 42, 5, 5, 5, 1, 2, 3, 50, 51, 60, 8, 9, 7, 1, 2, 3]
    index = SuffixIndex(max_match=3)
    index.extend(text)
    found = index.continuations(count=4, depth=3)
    assert found[0] == ([40, 41, 42], 6)  # the longer match first, although older
    assert found[1] == ([50, 51, 60], 3)
    for continuation, m in found:  # every reported length is the true one
        end = next(e for e in range(len(text) - 1) if text[e : e + len(continuation)] == continuation)
        assert m == _naive_match(text, end)


def test_continuations_after_a_guessed_tail():
    index = SuffixIndex(max_match=3)
    index.extend([10, 11, 12, 13, 14, 99, 20])
    # the text ends with 20, never followed by anything; after a guessed 11 it would go on as it did before
    assert index.continuations(2, 3) == []
    assert index.continuations(2, 3, tail=[11]) == [([12, 13, 14], 1)]
    assert index.tokens == [10, 11, 12, 13, 14, 99, 20]  # the guess is not added to the text


def test_match_buckets():
    assert [match_bucket(m) for m in (1, 2, 3, 4, 7, 8, 15, 16, 32)] == [1, 2, 3, 4, 4, 8, 8, 16, 16]


def test_tree_labels_alternatives_and_per_token_sources():
    stats = AcceptanceStats()
    tree = Tree()
    tree.add([5, 6, 7], "text:8", stats)
    tree.add([5, 9], "text:2", stats)  # shares node 5, then branches: 9 is an alternative to 6
    tree.add([4, 6], ["predicted", "text:1"], stats)  # a root alternative, then a copied token
    assert tree.sources == ["text:8", "text:8", "text:8", "text:2" + ALT, "predicted" + ALT, "text:1"]
    # an alternative's prior is half its source's: only one sibling can be right
    assert stats.p("text:2" + ALT, 2) == pytest.approx(stats.p("text:2", 2) * AcceptanceStats.ALTERNATIVE)
    assert tree.reach[3] == pytest.approx(tree.reach[0] * stats.p("text:2" + ALT, 2))
    # learned apart from the first children
    for _ in range(6):
        stats.update("text:2" + ALT, 2, False)
        stats.update("text:2", 2, True)
    assert stats.p("text:2" + ALT, 2) < 0.2 < 0.8 < stats.p("text:2", 2)
    # a draft's nodes are labelled by the tree, wherever the draft put them
    assert tree.labels([5, 9, 6, 0], [-1, 0, 0, -1], count=3) == ["text:8", "text:2" + ALT, "text:8", None]


def test_lookahead_proposes_a_copy_after_its_predicted_token():
    guesser = LookaheadGuesser(depth=6, max_match=3, num_candidates=4)
    guesser.start(torch.tensor([[10, 11, 12, 13, 14, 99, 20]]))
    guesser.pools[0].learn([99, 20], 11)  # the model once predicted 11 after "99 20"
    (candidates,) = guesser.get_candidates(torch.tensor([[10, 11, 12, 13, 14, 99, 20]]), max_depth=6)
    assert ([11, 12, 13, 14, 99, 20], ["predicted"] + ["text:1"] * 5) in candidates


class _CopyAfterGuess(Guesser):
    """Proposes, with per-token sources, the true continuation's first token and then a copy of what follows it
    (wrong after `good` tokens): a guesser of one's own using the list form of `source`."""

    def __init__(self, greedy: torch.LongTensor, good: int):
        self.greedy, self.good = greedy.tolist(), good

    def get_candidates(self, input_ids, max_depth):
        self.max_nodes = depth = min(8, max_depth)
        length = input_ids.shape[1]
        rows = []
        for row in self.greedy:
            guess = row[length : length + depth]
            guess = guess[: self.good] + [(t + 1) % 96 for t in guess[self.good :]]
            rows.append([(guess, ["predicted"] + ["text:8"] * (len(guess) - 1))] if guess else [])
        return rows


@pytest.mark.parametrize("good", [0, 3, 8])
def test_per_token_sources_decide_the_speed_not_the_output(good):
    model = tiny_bigram_llama()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [9, 4, 22]])
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=PAD)
    greedy = model.generate(ids, **kwargs)
    out = model.generate(
        ids, custom_generate=jacobi_decoding, guesser=_CopyAfterGuess(greedy, good), adaptive=False,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    assert out.sequences.tolist() == greedy.tolist()
    assert max(out.accepted_per_pass) == min(good, 8) + 1


def test_long_copies_are_labelled_learned_and_exact(monkeypatch):
    """On a model whose greedy text repeats a cycle, the copies come from long matches ("text:8", "text:16"): the
    acceptance statistics learn them under those labels, and the output (float32, left-padded batch) is greedy's."""
    model = copy.deepcopy(tiny_bigram_llama()).float()
    learned = []
    original = jacobi_module._learn_acceptance

    def spy(stats, draft, *args):
        learned.extend(s for row in (draft.sources or []) for s in row if s)
        return original(stats, draft, *args)

    monkeypatch.setattr(jacobi_module, "_learn_acceptance", spy)
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [40, 41, 9]])
    kwargs = dict(attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=PAD)
    greedy = model.generate(ids, **kwargs)
    out = model.generate(ids, custom_generate=jacobi_decoding, mode="lookahead", return_dict_in_generate=True, **kwargs)
    assert out.sequences.tolist() == greedy.tolist()
    assert {"text:8", "text:16"} & set(learned), sorted(set(learned))
    assert out.num_forward_passes < 0.5 * 60, out.accepted_per_pass


def test_a_call_whose_first_guesses_miss_trusts_every_source_less():
    """Counts carried from earlier calls say copies after a 2-token match are nearly always right; in this call
    first guesses of other sources keep missing: the call's factor scales every first guess down (deeper chances,
    conditional on an accepted parent, are left alone), and it recovers when guesses are accepted again."""
    carried = {("text:2", 1): [8.0, 8.0], ("text:2", 2): [7.0, 8.0]}
    stats, plain = AcceptanceStats(calibrate=True), AcceptanceStats()
    for s in (stats, plain):
        s.counts = {key: list(value) for key, value in carried.items()}
    trusted = plain.p("text:2", 1)
    assert stats.p("text:2", 1) == pytest.approx(trusted) and stats.call_factor() == 1.0
    for source in ["text:1", "predicted", "text:3"] * 4:
        stats.update(source, 1, False)
        plain.update(source, 1, False)
    assert plain.p("text:2", 1) == pytest.approx(trusted)  # per source alone: the carried counts still rule
    assert stats.p("text:2", 1) < 0.5 * trusted
    assert 0.2 <= stats.call_factor() < 0.5
    assert stats.p("text:2", 2) == plain.p("text:2", 2)
    for _ in range(20):
        stats.update("text:2", 1, True)
    assert stats.call_factor() > 0.8
