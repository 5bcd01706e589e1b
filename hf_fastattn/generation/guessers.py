"""Guessers: where a pass's guesses come from (step 1 of the loop in `jacobi.py`).

In the spirit of transformers' `CandidateGenerator`, a guesser has a small interface:

    start(ids)                      the prompts, before the first pass
    candidates(ids, max_depth)      per row, candidate continuations `(tokens, source)`, the most trusted first
    max_nodes                       at most this many guesses per row and pass
    observe(ids, draft, logits, n, path)
                                    what the pass showed: the model's predictions at every fed position

It proposes; it does not decide how much to verify. `speculation.plan` keeps the nodes worth their cost, from the
acceptance observed so far per `source` and depth. Sources: "text:m" (a copy of what followed an earlier occurrence
of the text's last m tokens: prompt lookup), "predicted" (the model's own predictions after each context, chained),
"jacobi" (the previous pass's predictions past the accepted tokens), "fill" (a position never predicted yet).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """The guesses of one pass. `tokens[b, i]` is node i of row b: a chain (node i follows node i - 1, node 0 follows
    the last committed token) unless `ancestors` is given, which makes it a tree.

    Tree fields, per row: `depth` `[B, q]` (1 for a child of the last committed token), `ancestors` `[B, q, q]`
    (`[b, i, j]` iff node j is node i or one of its ancestors), `children` ({(node, token): child}, node -1 the last
    committed token) and `parents` (each node's parent, -1 the last committed token). `sources[b][i]`: where node i
    of row b came from (None for padding), when known.
    """

    tokens: torch.LongTensor
    depth: torch.LongTensor | None = None
    ancestors: torch.BoolTensor | None = None
    children: list[dict] | None = None
    parents: list[list[int]] | None = None
    sources: list[list[str | None]] | None = None


class JacobiGuesser:
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

    def candidates(self, ids, max_depth: int):
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

    def observe(self, ids, draft, logits, n, path):
        q = draft.tokens.shape[1]
        # the predictions past the accepted ones (none when every guess was accepted: the window was too short)
        self.trajectory = logits[:, n:].argmax(-1) if n <= q else ids[:, :0]


class SuffixIndex:
    """Where each m-gram (m = 1..`max_match`) of a growing token list ends.

    `continuations` answers "what followed the last times the text ended like it does now": for the longest suffix
    of the text seen before, then shorter ones, the tokens after each earlier occurrence, newest first.
    """

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

    def continuations(self, count: int, depth: int) -> list[tuple[list[int], int]]:
        """Up to `count` distinct continuations of at most `depth` tokens, the most trusted first, each with the
        length m of the suffix match it came from."""
        text, found, seen = self.tokens, [], set()
        for m in range(min(self.max_match, len(text)), 0, -1):
            for end in reversed(self.ends.get(tuple(text[-m:]), ())):
                continuation = text[end : end + depth]
                if continuation and tuple(continuation) not in seen:
                    seen.add(tuple(continuation))
                    found.append((continuation, m))
                    if len(found) == count:
                        return found
        return found


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


class LookaheadGuesser:
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

    def candidates(self, ids, max_depth: int):
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
                found.append((continuation, f"text:{m}"))
            if trajectory:
                found.append((trajectory[:depth], "jacobi"))
            out.append(found)
        return out

    def observe(self, ids, draft, logits, n, path):
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


def _lineage(node: int, tokens: list[int], parents: list[int], limit: int) -> list[int]:
    """The tokens of `node` and of its ancestors, at most `limit`, oldest first."""
    lineage = [tokens[node]]
    while parents[node] >= 0 and len(lineage) < limit:
        node = parents[node]
        lineage.append(tokens[node])
    return lineage[::-1]


def build_draft(
    candidates: list[list[list[int]]], filler: list[int], device=None, sources: list[list[str]] | None = None
) -> Draft:
    """Merge each row's candidate continuations into a token tree (shared prefixes once) and pad the rows to one
    size; a single candidate per row gives a chain. Node order: the first candidate's tokens are nodes 0, 1, ...
    `sources[b][i]` (optional) is where candidate i of row b came from; a node keeps its first candidate's."""
    batch = len(candidates)
    if all(len(rows) <= 1 for rows in candidates):
        width = max((len(rows[0]) for rows in candidates if rows), default=0)
        chains = [(rows[0] if rows else []) for rows in candidates]
        tokens = [chain + [fill] * (width - len(chain)) for chain, fill in zip(chains, filler, strict=True)]
        node_sources = None
        if sources is not None:
            node_sources = [
                ([src[0]] * len(chain) if chain else []) + [None] * (width - len(chain))
                for chain, src in zip(chains, sources, strict=True)
            ]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=device).view(batch, width), sources=node_sources)
    trees = []  # per row: (tokens, depths, ancestor lists, children, parents, sources)
    for b, rows in enumerate(candidates):
        tokens, depths, lineage, children, parents, node_sources = [], [], [], {}, [], []
        for c, candidate in enumerate(rows):
            node = -1
            for token in candidate:
                child = children.get((node, token))
                if child is None:
                    child = len(tokens)
                    children[(node, token)] = child
                    tokens.append(token)
                    parents.append(node)
                    depths.append(depths[node] + 1 if node >= 0 else 1)
                    lineage.append((lineage[node] if node >= 0 else []) + [child])
                    node_sources.append(sources[b][c] if sources is not None else None)
                node = child
        trees.append((tokens, depths, lineage, children, parents, node_sources))
    width = max(len(tree[0]) for tree in trees)
    ancestors = torch.zeros(batch, width, width, dtype=torch.bool)
    token_rows, depth_rows = [], []
    for b, (tokens, depths, lineage, _, _, _) in enumerate(trees):
        pad = width - len(tokens)  # padding nodes: children of the root that no token ever leads to
        token_rows.append(tokens + [filler[b]] * pad)
        depth_rows.append(depths + [1] * pad)
        lineage = lineage + [[i] for i in range(len(tokens), width)]
        node_index = [i for i, line in enumerate(lineage) for _ in line]
        ancestor_index = [j for line in lineage for j in line]
        ancestors[b, node_index, ancestor_index] = True
    return Draft(
        tokens=torch.tensor(token_rows, dtype=torch.long, device=device),
        depth=torch.tensor(depth_rows, dtype=torch.long, device=device),
        ancestors=ancestors.to(device),
        children=[tree[3] for tree in trees],
        parents=[tree[4] + [-1] * (width - len(tree[4])) for tree in trees],
        sources=[tree[5] + [None] * (width - len(tree[5])) for tree in trees] if sources is not None else None,
    )
