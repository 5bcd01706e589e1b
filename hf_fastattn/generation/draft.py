"""The guesses one pass verifies: a `Draft` (a chain, or a token tree whose candidates share their prefixes), built
from the guessers' candidates by `build_draft` (step 1 of the loop in `jacobi.py`, after `speculation.plan` chose the
nodes worth their cost)."""

from __future__ import annotations

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
