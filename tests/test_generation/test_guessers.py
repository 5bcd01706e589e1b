"""The guesser interface (`guessers.Guesser`, in the spirit of transformers' `CandidateGenerator`): a guesser of
one's own plugs into Jacobi decoding; whatever it proposes, the output is greedy decoding's, and what it proposes
decides how many forwards that takes."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import PAD, left_padded, tiny_llama

from hf_fastattn.generation import jacobi_decoding, jacobi_generate
from hf_fastattn.generation.guessers import MODES, Guesser, JacobiGuesser, LookaheadGuesser, make_guesser

NEW = 24


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


class Oracle(Guesser):
    """Proposes the true greedy continuation (known in advance), `depth` tokens per pass; records the calls."""

    def __init__(self, greedy: torch.LongTensor, depth: int, wrong: bool = False):
        self.greedy, self.depth, self.wrong = greedy.tolist(), depth, wrong
        self.calls = {"start": 0, "get": 0, "update": 0, "committed": []}

    def start(self, input_ids):
        self.calls["start"] += 1

    def get_candidates(self, input_ids, max_depth):
        self.calls["get"] += 1
        self.max_nodes = depth = min(self.depth, max_depth)
        length = input_ids.shape[1]
        rows = []
        for row in self.greedy:
            guess = row[length : length + depth]
            if self.wrong:  # every guess off by one token id: none is ever accepted
                guess = [(t + 1) % 96 for t in guess]
            rows.append([(guess, "oracle")] if guess else [])
        return rows

    def update_candidate_strategy(self, input_ids, draft, scores, num_committed, path):
        self.calls["update"] += 1
        self.calls["committed"].append(num_committed)


def _run(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
        custom_generate=jacobi_decoding, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("wrong", [False, True])
def test_a_guesser_of_ones_own_decides_the_speed_not_the_output(wrong):
    model = tiny_llama()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [9, 4, 22]])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    oracle = Oracle(greedy, depth=6, wrong=wrong)
    out = _run(model, ids, mask, guesser=oracle, adaptive=False)
    assert out.sequences.tolist() == greedy.tolist()
    assert oracle.calls["start"] == 1
    assert oracle.calls["get"] == oracle.calls["update"] == out.num_forward_passes
    assert oracle.calls["committed"] == out.accepted_per_pass
    if wrong:  # one token per forward: greedy's count
        assert out.accepted_per_pass == [1] * NEW
    else:  # every guess accepted: 6 guesses + the model's own token per forward
        assert out.accepted_per_pass == [7, 7, 7, 3]


def test_the_modes_are_their_guessers():
    assert isinstance(make_guesser("lookahead"), LookaheadGuesser)
    for mode in ("jacobi", "gs_jacobi", "hybrid"):
        guesser = make_guesser(mode, block_size=5)
        assert isinstance(guesser, JacobiGuesser) and guesser.mode == mode
    assert set(MODES) == {"jacobi", "gs_jacobi", "hybrid", "lookahead"}
    with pytest.raises(ValueError, match=r"mode='beam' is not a Jacobi decoding mode; choose one of"):
        make_guesser("beam")
    with pytest.raises(ValueError, match=r"ngram_size=1 must be at least 2"):
        make_guesser("lookahead", ngram_size=1)


def test_old_method_names_are_aliases():
    """`candidates` / `observe` (the names before this release) call `get_candidates` / `update_candidate_strategy`."""
    model = tiny_llama()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12]])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    oracle = Oracle(greedy, depth=4)
    assert oracle.candidates(ids, 4) == oracle.get_candidates(ids, 4) == [[(greedy[0, 6:10].tolist(), "oracle")]]
    oracle.observe(ids, None, None, 3, [[0, 1]])
    assert oracle.calls["committed"] == [3]


def test_an_object_without_the_interface_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"guesser='object' lacks \['start', 'get_candidates'"):
        jacobi_generate(model, torch.tensor([[5, 6]]), max_new_tokens=4, guesser=object())
