"""Lookahead sampling has exactly the distribution of plain sampling: a goodness-of-fit test over many seeds.

The reference is independent of both samplers: the exact probabilities of the first two tokens, computed from the
model's logits with the same logits processors (temperature, top-k, top-p, repetition penalty). A chi-square test
at significance 1e-4 must accept our sampler and plain `generate(do_sample=True)` alike, and must reject a sampler
that accepts the draft whenever it has any probability (the bias of "accept the draft greedily").
"""

from __future__ import annotations

import collections

import pytest
import torch
from gen_helpers import tiny_bigram_llama
from scipy.stats import chi2
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_fastattn.generation import jacobi_decoding

PROMPT = [5, 17, 33, 8, 61, 12, 5, 17, 33, 8, 61, 12, 5, 17]  # repeats: prompt lookup drafts from the first pass
SETTINGS = dict(temperature=1.4, top_k=12, top_p=0.97, repetition_penalty=1.1)
ROWS, CALLS = 30, 50  # 1500 samples: each call samples a batch of identical prompts


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _exact(model) -> dict[tuple[int, int], float]:
    """P(x1, x2) under the processed distribution, computed from the model's logits directly."""
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(SETTINGS["repetition_penalty"]),
            TemperatureLogitsWarper(SETTINGS["temperature"]),
            TopKLogitsWarper(SETTINGS["top_k"]),
            TopPLogitsWarper(SETTINGS["top_p"]),
        ]
    )
    ids = torch.tensor([PROMPT])
    p1 = processors(ids, model(ids).logits[:, -1].double()).softmax(-1)[0]
    joint = {}
    for x1 in p1.nonzero().flatten().tolist():
        ids2 = torch.tensor([PROMPT + [x1]])
        p2 = processors(ids2, model(ids2).logits[:, -1].double()).softmax(-1)[0]
        for x2 in p2.nonzero().flatten().tolist():
            joint[(x1, x2)] = float(p1[x1] * p2[x2])
    return joint


def _samples(model, custom: bool) -> collections.Counter:
    counts = collections.Counter()
    ids = torch.tensor([PROMPT] * ROWS)
    for seed in range(CALLS):
        torch.manual_seed(seed)
        kwargs = dict(custom_generate=jacobi_decoding, mode="lookahead", adaptive=False) if custom else {}
        # a third token, so that the first pass also verifies drafts two deep (their second token can be accepted)
        out = model.generate(ids, do_sample=True, max_new_tokens=3, pad_token_id=0, **SETTINGS, **kwargs)
        counts.update(map(tuple, out[:, len(PROMPT) : len(PROMPT) + 2].tolist()))
    return counts


def _chi_square(counts: collections.Counter, exact: dict) -> tuple[float, float]:
    """(statistic, threshold at significance 1e-4); cells expected below 5 are pooled into one."""
    total = sum(counts.values())
    stat, pooled_expected, pooled_seen, cells = 0.0, 0.0, 0, 0
    for cell, prob in exact.items():
        expected = prob * total
        if expected < 5:
            pooled_expected += expected
            pooled_seen += counts.get(cell, 0)
            continue
        stat += (counts.get(cell, 0) - expected) ** 2 / expected
        cells += 1
    outside = sum(c for cell, c in counts.items() if cell not in exact)  # impossible outcomes: must never occur
    assert outside == 0, f"{outside} samples outside the support of the processed distribution"
    if pooled_expected > 0:
        stat += (pooled_seen - pooled_expected) ** 2 / pooled_expected
        cells += 1
    return stat, chi2.ppf(1 - 1e-4, cells - 1)


def test_lookahead_sampling_matches_the_exact_distribution(monkeypatch):
    model = tiny_bigram_llama()
    exact = _exact(model)
    assert len(exact) > 10 and max(exact.values()) < 0.6  # a distribution worth testing: spread over many pairs

    import hf_fastattn.generation.jacobi as jacobi

    drafts = collections.Counter()
    original = jacobi.accept_sampled

    def counting(ids, length, guesses, *args, **kwargs):
        drafts["passes"] += 1
        drafts["with guesses"] += guesses.shape[1] > 0
        return original(ids, length, guesses, *args, **kwargs)

    monkeypatch.setattr(jacobi, "accept_sampled", counting)
    ours = _samples(model, custom=True)
    assert drafts["with guesses"] >= 0.5 * drafts["passes"], drafts  # the drafts were really verified
    stat, threshold = _chi_square(ours, exact)
    assert stat < threshold, (stat, threshold)

    plain_stat, _ = _chi_square(_samples(model, custom=False), exact)  # the bound is one plain sampling meets
    assert plain_stat < threshold, (plain_stat, threshold)


def test_a_biased_sampler_fails_the_same_bound(monkeypatch):
    """Accepting the draft whenever it has any probability (u = 0 in the acceptance test) is the classic bias; the
    same test with the same samples count rejects it."""
    import hf_fastattn.generation.verify as verify

    model = tiny_bigram_llama()
    exact = _exact(model)
    monkeypatch.setattr(verify, "_uniform", lambda generator: 0.0)
    stat, threshold = _chi_square(_samples(model, custom=True), exact)
    assert stat > threshold, (stat, threshold)


def test_sampling_without_guesses_and_in_every_mode_stays_in_support():
    """Every mode samples (a Jacobi trajectory is a deterministic draft too); top-k keeps the support."""
    model = tiny_bigram_llama()
    ids = torch.tensor([PROMPT, PROMPT[:6] + [0] * 8])
    for mode in ("jacobi", "gs_jacobi", "hybrid", "lookahead"):
        torch.manual_seed(0)
        out = model.generate(
            ids, do_sample=True, max_new_tokens=6, top_k=1, pad_token_id=0, custom_generate=jacobi_decoding, mode=mode
        )
        greedy = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
        assert out.tolist() == greedy.tolist()  # top_k=1: sampling is greedy, whatever the draft


def test_sampling_on_a_recurrent_cache_with_top_k_1_is_greedy():
    """Sampling through the snapshot / restore path of a recurrent cache (transformers' assisted decoding refuses
    such caches), in a left-padded batch."""
    from gen_helpers import left_padded, tiny_bigram_qwen3_next

    model = tiny_bigram_qwen3_next()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [9, 4]])
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, pad_token_id=0)
    torch.manual_seed(0)
    out = model.generate(
        ids, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=30, pad_token_id=0, block_size=6,
        custom_generate=jacobi_decoding, mode="lookahead", adaptive=False, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences.tolist() == greedy.tolist()
    assert max(out.accepted_per_pass) > 1  # guesses were accepted through the sampling rule
