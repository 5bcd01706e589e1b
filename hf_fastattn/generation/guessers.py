"""Guessers: where a pass's guesses come from (step 1 of the loop in `jacobi.py`).

A guesser is a `Guesser`, an interface in the spirit of transformers' `CandidateGenerator` (assisted generation,
prompt lookup), with the same two calls:

    start(input_ids)                the prompts, before the first pass
    get_candidates(input_ids, max_depth)
                                    per row, candidate continuations `(tokens, source)`, the most trusted first
    update_candidate_strategy(input_ids, draft, scores, num_committed, path)
                                    what the pass showed: the model's scores at every fed position
    max_nodes                       at most this many guesses per row and pass (read after get_candidates)

Unlike a `CandidateGenerator` it proposes and does not decide how much to verify, nor returns a tensor: several
candidates per row may share prefixes (a tree, `draft.build_draft`), and `speculation.plan` keeps the nodes worth
their cost from the acceptance observed so far per `source` and depth. Sources: "text:m" (a copy of what followed an
earlier occurrence of the text's last m tokens: prompt lookup; m is the match's full length, bucketed by
`match_bucket`), "predicted" (the model's own predictions after each
context, chained), "jacobi" (the previous pass's predictions past the accepted tokens), "fill" (a position never
predicted yet). The former method names `candidates` and `observe` remain as aliases for one release.

The modes (`make_guesser`) differ only in their guesser:

    "jacobi"     (`JacobiGuesser`) the window covers all remaining new tokens (up to `max_new_tokens`, or
                 `block_size`); each pass re-guesses the unconverged part with the previous pass's predictions
                 (plain Jacobi iteration, Santilli et al. 2023).
    "gs_jacobi"  Gauss-Seidel-Jacobi: blocks of `block_size` tokens; Jacobi iterations on one block until it has
                 converged (it is then in the cache), then the next block starts.
    "hybrid"     a sliding window of `block_size` guesses that moves on as soon as a prefix converges and stops at
                 EOS or any stopping criterion: GS-Jacobi for outputs of unknown length. (The name predates the
                 library's other "hybrid"s and means neither: not the LoLCATs sliding-window + linear attention,
                 `integration/hybrid_attention.py`, nor transformers' hybrid caches; kept for compatibility.)
    "lookahead"  (`LookaheadGuesser`, after Fu et al. 2024): guesses come from an n-gram pool and several candidates
                 are verified in the same forward, as one token tree (their verification branch). The pool
                 (`NGramPool`) holds the committed text itself (prompt and output so far: the continuations after
                 earlier occurrences of its own suffix, "prompt lookup") and the model's own predictions after every
                 context it has seen (every guess, rejected ones included: the n-grams their Jacobi trajectories
                 yield), plus the Jacobi update (the predictions below the last accepted node). There is no separate
                 2D Jacobi "lookahead branch" spending extra positions. A copy may also start after the first
                 predicted (or Jacobi) token: a quote whose preceding token differs (a line break where the source
                 had a blank line, " he" for " He"). (Predictions after prompt positions are not learned by
                 default: each costs an LM-head row, 49152 x 576 on SmolLM2, more than it saves.)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .draft import Draft, build_draft  # noqa: F401  (re-exported: they lived here until this release)

MODES = ("jacobi", "gs_jacobi", "hybrid", "lookahead")
# per row: (tokens, source), the most trusted first; source is a str, or a list of one per token
Candidates = list[list[tuple[list[int], str | list[str]]]]


class Guesser:
    """The interface of a guesser (see the module docstring); subclasses implement `get_candidates` and, if they
    learn from the passes, `update_candidate_strategy`."""

    max_nodes: int = 0  # at most this many guesses per row in the pass just proposed
    learns_from: int = 0  # predictions wanted after committed tokens other than the last one

    def start(self, input_ids: torch.LongTensor) -> None:
        """Called once with the prompts `[B, P]` before the first pass."""

    def get_candidates(self, input_ids: torch.LongTensor, max_depth: int) -> Candidates:
        """Per row of `input_ids` (the committed tokens `[B, L]`), candidate continuations of at most `max_depth`
        tokens with their source (or a list: each token's), the most trusted first; an empty list: no guess (a
        plain greedy step)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_candidates")

    def update_candidate_strategy(
        self, input_ids: torch.LongTensor, draft: Draft, scores: torch.Tensor, num_committed: int, path
    ) -> None:
        """What the pass showed. `input_ids`: the committed tokens after it `[B, L']`; `draft`: the guesses
        verified; `scores`: the logits `[B, u + q, V]` of the fed positions (the last committed token's row, then
        one per guess; earlier committed tokens first when the forward fed them); `num_committed`: the tokens the
        pass committed (transformers' `num_matches` + 1: the accepted guesses and the model's own next token);
        `path[b]`: the accepted nodes of row b, in order."""

    # the former names, kept for one release
    def candidates(self, ids, max_depth: int) -> Candidates:
        return self.get_candidates(ids, max_depth)

    def observe(self, ids, draft, logits, n, path) -> None:
        return self.update_candidate_strategy(ids, draft, logits, n, path)


def make_guesser(mode: str, block_size=None, max_iterations=None, ngram_size: int = 4, num_candidates: int = 4):
    """The guesser of a Jacobi decoding `mode` (one of `MODES`), with a ValueError naming any bad option."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a Jacobi decoding mode; choose one of {MODES}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer")
    if ngram_size < 2:
        raise ValueError(f"ngram_size={ngram_size} must be at least 2")
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates} must be a positive integer")
    if mode == "lookahead":
        return LookaheadGuesser(block_size or 12, ngram_size - 1, num_candidates)
    return JacobiGuesser(mode, block_size, max_iterations)


class JacobiGuesser(Guesser):
    """Guesses for "jacobi", "gs_jacobi" and "hybrid": last pass's predictions, shifted past the accepted tokens.

    `trajectory[:, i]` is the current guess for position `L + i` (L = committed length): the prediction the model
    made for that position in the previous pass. Positions never predicted yet are filled with the last token
    (Santilli et al. use padding; any token is as good as a first guess).
    """

    learns_from = 0  # predictions wanted after committed tokens other than the last one

    def __init__(self, mode, block_size, max_iterations):
        self.mode, self.max_iterations = mode, max_iterations
        self.block_size = block_size if block_size is not None else (None if mode == "jacobi" else 16)
        self.trajectory = None  # [B, t]
        self.prompt_len, self.block_id, self.iterations = 0, None, 0
        self.max_nodes = 0

    def start(self, ids):
        self.trajectory, self.prompt_len = ids[:, :0], ids.shape[1]

    def num_guesses(self, length: int, max_depth: int) -> int:
        """The mode's window: number of guesses k for the next pass (its forward then scores positions L .. L + k)."""
        if self.mode == "gs_jacobi":
            # the block holding position L; its last pass also yields the first token of the next block
            block = (length - self.prompt_len) // self.block_size
            k = self.prompt_len + (block + 1) * self.block_size - length
        else:
            block = length  # a sliding window: every position is a new "block" for max_iterations
            k = self.block_size or max_depth
        if block != self.block_id:
            self.block_id, self.iterations = block, 0
        self.iterations += 1
        if self.max_iterations is not None and self.iterations > self.max_iterations:
            k = 0
        return max(0, min(k, max_depth))

    def get_candidates(self, ids, max_depth: int) -> Candidates:
        k = self.max_nodes = self.num_guesses(ids.shape[1], max_depth)
        if k == 0:
            return [[] for _ in range(ids.shape[0])]
        known = self.trajectory[:, :k].tolist()
        out = []
        for row, last in zip(known, ids[:, -1].tolist(), strict=True):
            chain = [(row, "jacobi")] if row else []
            if len(row) < k:  # (a chain: the filler continues the known part)
                chain = [(row + [last] * (k - len(row)), "fill" if not row else "jacobi")]
            out.append(chain)
        return out

    def update_candidate_strategy(self, ids, draft, logits, n, path):
        q = draft.tokens.shape[1]
        # the predictions past the accepted ones (none when every guess was accepted: the window was too short)
        self.trajectory = logits[:, n:].argmax(-1) if n <= q else ids[:, :0]


class SuffixIndex:
    """Where each m-gram (m = 1..`max_match`) of a growing token list ends.

    `continuations` answers "what followed the last times the text ended like it does now": for the longest suffix
    of the text seen before, then shorter ones, the tokens after each earlier occurrence, newest first.
    """

    LONG_MATCH = 32  # matches are measured up to this many tokens
    SCAN = 64  # at most this many earlier occurrences of a suffix are looked at (the newest)

    def __init__(self, max_match: int):
        self.max_match = max_match
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for m in range(1, min(self.max_match, end) + 1):
                self.ends[tuple(self.tokens[end - m : end])].append(end)

    def continuations(self, count: int, depth: int, tail: list[int] | None = None) -> list[tuple[list[int], int]]:
        """Up to `count` distinct continuations of at most `depth` tokens, the most trusted first, each with the
        length m of the suffix match it came from; with `tail`, of the text followed by those tokens (a guess).

        The index finds earlier occurrences of the text's last 1..`max_match` tokens; each occurrence's match is then
        measured in full (up to `LONG_MATCH` tokens, comparing backwards): inside a long copy (a passage being
        quoted, code being rewritten) the match is much longer than `max_match`, and its continuation much likelier
        to be right (SmolLM2-135M on the benchmark's chat prompts: the first copied token is accepted 69% of the time
        after a 3-token match, 84-92% after 4 or more). Longest match first, then the newest occurrence.
        """
        text, found, seen = self.tokens, [], set()
        if tail:
            text = text + list(tail)
        for m in range(min(self.max_match, len(text)), 0, -1):
            ends = self.ends.get(tuple(text[-m:]), ())
            group = []
            for end in reversed(ends[-self.SCAN :] if len(ends) > self.SCAN else ends):
                continuation = text[end : end + depth]
                if continuation and tuple(continuation) not in seen:
                    seen.add(tuple(continuation))
                    group.append((continuation, _match_length(text, end, m, self.LONG_MATCH)))
            group.sort(key=lambda item: -item[1])  # (stable: the newest first among equally long matches)
            found.extend(group)
            if len(found) >= count:
                break
        return found[:count]


def _match_length(text: list[int], end: int, known: int, limit: int) -> int:
    """How many tokens before `end` equal the last tokens of `text` (at least `known`, at most `limit`)."""
    last, m = len(text), known
    while m < limit and end - m > 0 and text[end - m - 1] == text[last - m - 1]:
        m += 1
    return m


class NGramPool:
    """One row's n-gram pool: the committed text, and the model's own predictions.

    The text (prompt and output so far, exactly greedy) gives whole continuations (`SuffixIndex`). `predicted` maps
    contexts of 1..`max_match` tokens to the token the model predicted after them, at every position of every
    forward: every guess, rejected ones included (a guessed context is still one the model continued: the n-grams of
    Fu et al.'s Jacobi trajectories). Chaining those lookups gives one more candidate, which is what guesses a token
    the text has never been followed by.
    """

    def __init__(self, max_match: int):
        self.max_match = max_match
        self.text = SuffixIndex(max_match)
        self.predicted: dict[tuple[int, ...], int] = {}

    def learn(self, context: list[int], prediction: int) -> None:
        for m in range(1, min(self.max_match, len(context)) + 1):
            self.predicted[tuple(context[-m:])] = prediction

    def predicted_chain(self, depth: int) -> list[int]:
        """Up to `depth` tokens, each the model's latest prediction after the longest known context before it."""
        context, chain = self.text.tokens[-self.max_match :], []
        while len(chain) < depth:
            for m in range(min(self.max_match, len(context)), 0, -1):
                token = self.predicted.get(tuple(context[-m:]))
                if token is not None:
                    break
            else:
                break
            chain.append(token)
            context = context[1:] + [token]
        return chain


class LookaheadGuesser(Guesser):
    """Lookahead decoding: candidate continuations from each row's `NGramPool` and the Jacobi trajectory.

    Per row: the model's predicted chain, up to `num_candidates` continuations copied from the text (prompt
    lookup, longest suffix match first) and the predictions below the deepest accepted node of the last pass (the
    Jacobi update), each up to `depth` tokens; `speculation.plan` keeps the part of their tree worth verifying.
    """

    learns_from = 0  # predictions after earlier prompt tokens: each costs an LM-head row (49152 x 576 for SmolLM2)

    def __init__(self, depth: int, max_match: int, num_candidates: int):
        self.depth, self.max_match, self.num_candidates = depth, max_match, num_candidates
        self.max_nodes = 2 * depth
        self.pools: list[NGramPool] = []
        self.trajectory: list[list[int]] = []

    def start(self, ids):
        self.pools = [NGramPool(self.max_match) for _ in range(ids.shape[0])]
        for pool, row in zip(self.pools, ids.tolist(), strict=True):
            pool.text.extend(row)
        self.trajectory = [[] for _ in self.pools]

    def get_candidates(self, ids, max_depth: int) -> Candidates:
        depth = min(self.depth, max_depth)
        self.max_nodes = 2 * depth
        if depth == 0:
            return [[] for _ in self.pools]
        out = []
        for pool, trajectory in zip(self.pools, self.trajectory, strict=True):
            found = []
            chain = pool.predicted_chain(depth)
            if chain:
                found.append((chain, "predicted"))
            for continuation, m in pool.text.continuations(self.num_candidates, depth):
                found.append((continuation, f"text:{match_bucket(m)}"))
            if trajectory:
                found.append((trajectory[:depth], "jacobi"))
            # a copy that starts after a guessed token: the text's continuation after [text, first guess] (the
            # start of a quote whose preceding token differs: "\n" for "\n\n", " he" for " He"...)
            firsts = []
            for tokens, source in list(found):
                if source in ("predicted", "jacobi") and tokens[0] not in firsts and depth > 1:
                    firsts.append(tokens[0])
                    for continuation, m in pool.text.continuations(1, depth - 1, tail=tokens[:1]):
                        copied = [f"text:{match_bucket(m)}"] * len(continuation)
                        found.append(([tokens[0], *continuation], [source, *copied]))
            out.append(found)
        return out

    def update_candidate_strategy(self, ids, draft, logits, n, path):
        q, predictions = draft.tokens.shape[1], logits.argmax(-1)
        parents = draft.parents or [list(range(-1, q - 1))] * len(self.pools)  # a chain: node i follows i - 1
        rows = zip(
            self.pools, ids.tolist(), draft.tokens.tolist(), parents, predictions.tolist(), path, strict=True
        )
        for b, (pool, row, guesses, parent_of, predicted, kept) in enumerate(rows):
            # predictions after the committed tokens fed (the last one is the root), then after each guess
            after_committed, after_guesses = predicted[: len(predicted) - q], predicted[len(predicted) - q :]
            old = len(pool.text.tokens)
            for i, prediction in enumerate(after_committed):
                end = old - len(after_committed) + i + 1
                pool.learn(row[max(0, end - self.max_match) : end], prediction)
            context = row[max(0, old - self.max_match) : old]
            for node, prediction in enumerate(after_guesses):
                pool.learn(context + _lineage(node, guesses, parent_of, self.max_match), prediction)
            pool.text.extend(row[old:])
            # the Jacobi update: predictions below the deepest accepted node, along first children
            first_child: dict[int, int] = {}
            for node, parent in enumerate(parent_of):
                first_child.setdefault(parent, node)
            self.trajectory[b], node = [], first_child.get(kept[-1] if kept else -1)
            while node is not None:
                self.trajectory[b].append(after_guesses[node])
                node = first_child.get(node)


def match_bucket(m: int) -> int:
    """The suffix-match length a "text:m" source is labelled with: 1, 2, 3, then 4 (4-7 tokens), 8 (8-15), 16
    (16 or more), so that acceptance is learned per bucket (it grows with the match: see `SuffixIndex`)."""
    return m if m < 4 else (4 if m < 8 else (8 if m < 16 else 16))


def _lineage(node: int, tokens: list[int], parents: list[int], limit: int) -> list[int]:
    """The tokens of `node` and of its ancestors, at most `limit`, oldest first."""
    lineage = [tokens[node]]
    while parents[node] >= 0 and len(lineage) < limit:
        node = parents[node]
        lineage.append(tokens[node])
    return lineage[::-1]
