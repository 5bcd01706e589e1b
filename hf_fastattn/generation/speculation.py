"""Cost-aware speculation: how many guesses a pass verifies, chosen for expected tokens per second.

A pass that feeds u uncached committed tokens and q guesses per row costs `t(u + q)` seconds (a curve per batch
size B: a batch of B rows is not B times one row's cost, nor the cost of B * (u + q) tokens in one row) and
commits `1 + (guesses accepted)` tokens. Guessing pays only if the expected extra tokens outweigh the extra cost:
on a CPU a 135M model's forward over 8 tokens costs ~1.2x one over 1 token, over 32 tokens ~3x. So each pass:

1. the guesser proposes candidate continuations, each node tagged with where it came from (`source`: a copy from
   the text after a suffix match of length m, the model's own predicted chain, the Jacobi trajectory; "|alt" added
   when the node's parent already has a more trusted child) and its depth;
2. `AcceptanceStats` estimates each node's chance of being accepted given that its parent is: a Beta posterior per
   (source, depth) from what the passes so far showed; a node's chance of being reached is the product along its
   path;
3. `plan` adds nodes in order of that chance (a parent is never less likely than its child, so every prefix of the
   order is a tree) and keeps the number j of nodes that maximizes `(1 + expected accepted) / t(u + j)`:
   j = 0, a plain greedy step, when no guess is worth its cost.

`ForwardCost` is `t(n)`: measured for this model on this machine (a few timed forwards on the first call, cached
per model, thread count and batch size) and refined online from every pass's own forward time (a running minimum per size
bucket, slowly forgotten, so noise on a shared machine does not inflate it), plus the decoding loop's own time around
a forward of that size (a running mean: verifying and rolling back guesses is Python work too).

Nothing here touches the tokens that are committed: verification alone decides them, so planning cannot change the
output, only the speed.
"""

from __future__ import annotations

import time
import weakref

import torch

# sizes (tokens fed, batch included) at which forward times are kept; others are interpolated
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_PERSISTENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(threads, batch): ForwardCost}


def _bucket(tokens: int) -> int:
    """The size of `BUCKETS` nearest to `tokens`, where a time measured over `tokens` tokens is kept."""
    return min(BUCKETS, key=lambda b: abs(b - tokens))


class ForwardCost:
    """Seconds of one forward as a function of the tokens fed per row, `t(n)`, piecewise linear over `BUCKETS`.

    Until a size has been measured, the curve is the measured one-token time times a prior shape (flat to 8 tokens,
    then linear: what a memory-bound small model shows), so planning is cautious but not frozen.
    """

    PRIOR_PER_TOKEN = 0.04  # prior extra cost of each fed token beyond the first, as a fraction of t(1)
    OVERHEAD_WEIGHT = 0.1  # weight of a new pass in the running mean of the loop's own time per bucket

    def __init__(self):
        self.seconds: dict[int, float] = {}
        # the decoding loop's own time around a forward over n tokens (planning, verification, rollback, the guesser's
        # update): a running mean per bucket. A pass with guesses costs more of it: SmolLM2-135M, 1 thread, 0.6 ms
        # around a one-token forward, 1.3 ms around three tokens, ~5 ms around 13-64 (a forward over one: 55 ms)
        self.overhead: dict[int, float] = {}
        # tokens per row a forward over n really computes (`fastpath.RowPlan.computed_tokens`: padded to a measured
        # size); None: n
        self.computed_tokens = None
        self.calibrated = False
        self._curve: dict[int, float] | None = None  # `curve()`, until the next `record`
        self._at: dict[int, float] = {}  # `t(n)` so far, until the next `record` (a pass asks for many n)

    @classmethod
    def for_model(cls, model, batch: int = 1) -> ForwardCost:
        """The cost curve of `model` at the current torch thread count and `batch` rows (shared across calls)."""
        per_model = _PERSISTENT.setdefault(model, {})
        return per_model.setdefault((torch.get_num_threads(), batch), cls())

    def record(self, tokens: int, seconds: float) -> None:
        """A measured forward over `tokens` tokens per row."""
        tokens = self._computed(tokens)
        bucket = _bucket(tokens)
        seconds = seconds * bucket / tokens if tokens > bucket else seconds  # (a conservative rescale)
        self._curve, self._at = None, {}
        old = self.seconds.get(bucket)
        # a running minimum that forgets slowly: noise only ever adds time
        self.seconds[bucket] = seconds if old is None else min(seconds, old * 1.02 + 0.02 * seconds)

    def record_overhead(self, tokens: int, seconds: float) -> None:
        """The loop's own time (outside the model) of a pass that fed `tokens` tokens per row."""
        bucket = _bucket(tokens)
        self._at = {}
        old = self.overhead.get(bucket)
        self.overhead[bucket] = seconds if old is None else old + self.OVERHEAD_WEIGHT * (seconds - old)

    def _overhead(self, tokens: int) -> float:
        """The loop's own time around a forward over `tokens` tokens: interpolated between the buckets measured, the
        nearest one's beyond them (0 before any)."""
        if not self.overhead:
            return 0.0
        known = sorted(self.overhead)
        if tokens <= known[0]:
            return self.overhead[known[0]]
        if tokens >= known[-1]:
            return self.overhead[known[-1]]
        hi = next(b for b in known if b >= tokens)
        lo = known[known.index(hi) - 1]
        w = (tokens - lo) / (hi - lo)
        return (1 - w) * self.overhead[lo] + w * self.overhead[hi]

    def curve(self) -> dict[int, float]:
        """The measured points, made non-decreasing from the right: a forward over more tokens is never cheaper, so
        a size measured slower than a larger one was measured in a noisy moment and gets the larger one's time."""
        if self._curve is not None:
            return self._curve
        known = sorted(self.seconds)
        out, floor = {}, float("inf")
        for b in reversed(known):
            floor = min(floor, self.seconds[b])
            out[b] = floor
        self._curve = out
        return out

    def __call__(self, tokens: int) -> float:
        """Seconds of a pass feeding `tokens` tokens per row: the forward and the loop's own time around it."""
        known = self._at.get(tokens)
        if known is None:
            known = self._at[tokens] = self._interpolate(self._computed(tokens)) + self._overhead(tokens)
        return known

    def _computed(self, tokens: int) -> int:
        return tokens if self.computed_tokens is None else self.computed_tokens(tokens)

    def _interpolate(self, tokens: int) -> float:
        if not self.seconds:
            return 1.0 + self.PRIOR_PER_TOKEN * (tokens - 1)
        points = self.curve()
        known = sorted(points)
        base = points.get(1, points[known[0]] / (1 + self.PRIOR_PER_TOKEN * (known[0] - 1)))
        if tokens in points:
            return points[tokens]
        below = [b for b in known if b < tokens]
        above = [b for b in known if b > tokens]
        if below and above:
            lo, hi = below[-1], above[0]
            w = (tokens - lo) / (hi - lo)
            return (1 - w) * points[lo] + w * points[hi]
        if below:  # beyond the largest measured size: at least linear growth from the last two points
            lo = below[-1]
            slope = self.PRIOR_PER_TOKEN * base
            if len(below) >= 2:
                prev = below[-2]
                slope = max(slope, (points[lo] - points[prev]) / (lo - prev))
            return points[lo] + slope * (tokens - lo)
        return max(base, points[above[0]] - self.PRIOR_PER_TOKEN * base * (above[0] - tokens))

    def calibrate(self, timed_forward, sizes=(1, 2, 4, 8, 16, 32), repeats: int = 2) -> None:
        """Measure `t(k)` for k in `sizes` with `timed_forward(k)` (a forward over k tokens per row, undone)."""
        for _ in range(repeats):
            for k in sizes:
                start = time.perf_counter()
                timed_forward(k)
                self.record(k, time.perf_counter() - start)
        self.calibrated = True


class AcceptanceStats:
    """Chance that a guess is accepted given that its parent is, per (source, depth): a Beta posterior.

    Depths are pooled as 1, 2-3 and 4+: once a copy is accepted it tends to go on (a deeper guess is likelier than
    the first one), and pooling learns that within a few passes. An *alternative*, a node added below a parent that
    already had a more trusted child (source `"...|alt"`, see `Tree`), is counted apart: only one sibling can be
    right, and the second copy of a passage or the second prediction is right far less often than the first
    (SmolLM2-135M on chat prompts, copies after a 4-7 token match at depth 4+: 3 of 4 first children accepted, 0 of
    6 alternatives; pooled, they made every deep guess look unlikely). A decoding call starts from what earlier calls on
    the same model saw (`for_model`, capped at `carried` tries per key, so a new prompt soon speaks for itself) and
    hands its counts back at the end (`merge_into_model`).

    Args:
        prior (`dict[str, float]`): prior mean per source kind ("text", "predicted", "jacobi"); weight `strength`.
    """

    DEFAULT_PRIOR = {"text": 0.5, "predicted": 0.4, "jacobi": 0.15, "fill": 0.05}
    DEEPER = 1.5  # the prior of a deeper guess: this times the first one's (at most 0.9)
    ALTERNATIVE = 0.5  # the prior of an alternative (a node with a more trusted sibling): this times the first's

    CALL_WEIGHT = 2.0  # pseudo-guesses behind the call's calibration factor (see `call_factor`)
    CALL_FLOOR = 0.2  # the least that factor gets

    def __init__(self, prior: dict[str, float] | None = None, strength: float = 2.0, calibrate: bool = False):
        self.prior = dict(self.DEFAULT_PRIOR, **(prior or {}))
        self.strength = strength
        self.counts: dict[tuple, list[float]] = {}
        self.calibrate = calibrate
        self.expected = self.observed = 0.0  # this call's first guesses: chances summed, acceptances counted
        self._p: dict[tuple, float] = {}  # `p` so far, until the next `update`

    @classmethod
    def for_model(cls, model, carried: float = 8.0) -> AcceptanceStats:
        stats = cls(calibrate=True)
        for key, (hits, tries) in _PERSISTENT_STATS.get(model, {}).items():
            scale = min(1.0, carried / tries) if tries else 0.0
            stats.counts[key] = [hits * scale, tries * scale]
        return stats

    def merge_into_model(self, model, carried: float = 8.0) -> None:
        """Add this call's counts to `model`'s (what the next call starts from)."""
        old = _PERSISTENT_STATS.setdefault(model, {})
        for key, (hits, tries) in self.counts.items():
            old[key] = [hits, tries]  # (this call started from the carried counts: they are already in)

    @staticmethod
    def key(source: str, depth: int) -> tuple:
        return source, 1 if depth == 1 else (2 if depth <= 3 else 3)

    def call_factor(self) -> float:
        """How this call's first guesses (depth 1) fare against the chances the counts gave them: accepted over
        expected, smoothed by `CALL_WEIGHT` and kept within [`CALL_FLOOR`, 1.5]. The counts carried from earlier
        calls speak per source; a prompt unlike them (open-ended after input-grounded ones) misses with every source
        at once, and this factor, which scales every first guess's chance, learns that from all of them together."""
        if not self.calibrate:
            return 1.0
        return min(1.5, max(self.CALL_FLOOR, (self.observed + self.CALL_WEIGHT) / (self.expected + self.CALL_WEIGHT)))

    def p(self, source: str, depth: int) -> float:
        known = self._p.get((source, depth))
        if known is None:
            chance = self._mean(source, depth)
            known = chance if depth > 1 else min(0.98, chance * self.call_factor())
            self._p[source, depth] = known
        return known

    def _mean(self, source: str, depth: int) -> float:
        kind = source.split(":")[0].split(ALT)[0]
        prior = self.prior.get(kind, 0.2)
        if depth > 1:
            prior = min(0.9, prior * self.DEEPER)
        if source.endswith(ALT):
            prior *= self.ALTERNATIVE
        hits, tries = self.counts.get(self.key(source, depth), (0.0, 0.0))
        return (hits + self.strength * prior) / (tries + self.strength)

    def update(self, source: str, depth: int, accepted: bool) -> None:
        self._p = {}
        if depth == 1:
            self.expected += self._mean(source, depth)
            self.observed += accepted
        counts = self.counts.setdefault(self.key(source, depth), [0.0, 0.0])
        counts[0] += accepted
        counts[1] += 1.0


_PERSISTENT_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: [hits, tries]}
ALT = "|alt"  # the suffix of an alternative's source (a node with a more trusted elder sibling)


class Tree:
    """One row's candidate nodes: `tokens`, `parents` (-1: the root), `sources`, `depths`, and `reach` (the
    estimated chance that the node is accepted: the product of its path's conditional chances).

    Candidates are added most trusted first; a node created below a parent that already has a child is an
    alternative, and its source carries the `ALT` suffix (its chance is learned apart: `AcceptanceStats`)."""

    MIN_REACH = 1e-3  # what the decoding loop passes as `min_reach` when it plans by cost

    def __init__(self, min_reach: float = 0.0):
        self.min_reach = min_reach  # a candidate's remaining tokens are not added once reaching them is less likely
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.sources: list[str] = []
        self.depths: list[int] = []
        self.reach: list[float] = []
        self.children: dict[tuple[int, int], int] = {}
        self._has_child: set[int] = set()

    def add(self, tokens: list[int], source: str | list[str], stats: AcceptanceStats) -> None:
        """Add a candidate continuation; `source` is where it came from, or a list: each token's."""
        sources = [source] * len(tokens) if isinstance(source, str) else source
        node = -1
        for token, source in zip(tokens, sources, strict=True):
            child = self.children.get((node, token))
            depth = self.depths[node] + 1 if node >= 0 else 1
            above = self.reach[node] if node >= 0 else 1.0
            if child is None and above < self.min_reach:
                break  # (the nodes below could add at most `min_reach` expected tokens between them)
            if child is None:
                label = source + ALT if node in self._has_child else source
                child = len(self.tokens)
                self.children[(node, token)] = child
                self._has_child.add(node)
                self.tokens.append(token)
                self.parents.append(node)
                self.sources.append(label)
                self.depths.append(depth)
                self.reach.append(above * stats.p(label, depth))
            else:
                # two sources agree on this node: the more trusted one speaks for it (descendants keep theirs)
                label = source + ALT if self.sources[child].endswith(ALT) else source
                chance = stats.p(label, depth)
                if chance * above > self.reach[child]:
                    self.sources[child] = label
                    self.reach[child] = chance * above
            node = child

    def labels(self, draft_tokens: list[int], draft_parents: list[int], count: int) -> list[str | None]:
        """The sources of the first `count` nodes of a draft built from this tree's paths (`draft_parents[i]`: node
        i's parent in the draft), found by their tokens; later (padding) nodes get None."""
        mine: list[int] = []
        for i in range(min(count, len(draft_tokens))):
            parent = draft_parents[i]
            mine.append(self.children[(mine[parent] if parent >= 0 else -1, draft_tokens[i])])
        return [self.sources[n] for n in mine] + [None] * (len(draft_tokens) - len(mine))

    def order(self) -> list[int]:
        """Nodes by decreasing reach, every parent before its children."""
        ranked = sorted(range(len(self.tokens)), key=lambda i: (-self.reach[i], self.depths[i], i))
        seen, out = set(), []
        for i in ranked:  # (reach never grows along a path; the loop only guards against float ties)
            chain, node = [], i
            while node >= 0 and node not in seen:
                chain.append(node)
                node = self.parents[node]
            for n in reversed(chain):
                seen.add(n)
                out.append(n)
        return out

    def paths(self, nodes: list[int]) -> list[tuple[list[int], str]]:
        """The selected nodes as root-to-leaf token lists (with the leaf's source), for `build_draft`."""
        chosen = set(nodes)
        has_child = {self.parents[n] for n in nodes}
        out = []
        for n in nodes:
            if n in has_child:
                continue
            path, node = [], n
            while node >= 0:
                path.append(node)
                node = self.parents[node]
            out.append(([self.tokens[i] for i in reversed(path)], self.sources[n]))
            assert all(i in chosen for i in path)
        return out


def plan(
    trees: list[Tree],
    cost: ForwardCost,
    uncached: int,
    max_nodes: int,
    chain_only: bool = False,
    force: int | None = None,
) -> list[list[int]]:
    """The nodes of each row to verify this pass (in `Tree.order`), chosen for expected tokens per second.

    Args:
        trees: per row, its candidate tree.
        cost: `t(n)` for n tokens fed per row, at this batch size.
        uncached (`int`): committed tokens fed per row besides the guesses (usually 1).
        max_nodes (`int`): at most this many guesses per row.
        chain_only (`bool`): a single path per row (the cache or the attention cannot take a tree).
        force (`int`, *optional*): take exactly this many nodes where available (no cost model: `adaptive=False`).

    Returns:
        per row, the selected node indices; every row gets the same count or fewer (then padded).
    """
    orders = []
    for tree in trees:
        order = tree.order()
        if chain_only:  # one path: from the root, always the likeliest child
            path, node = [], -1
            while True:
                kids = [i for i in order if tree.parents[i] == node]
                if not kids:
                    break
                node = kids[0]
                path.append(node)
            order = path
        orders.append(order[:max_nodes])
    width = max((len(o) for o in orders), default=0)
    if force is not None:
        j = min(force, width)
        return [o[:j] for o in orders]
    best_j, best_rate = 0, 1.0 / cost(uncached)
    gains = [[0.0] for _ in orders]
    for gain, order, tree in zip(gains, orders, trees, strict=True):
        for n in order:
            gain.append(gain[-1] + tree.reach[n])
    for j in range(1, width + 1):
        expected = 1.0 + min(gain[min(j, len(gain) - 1)] for gain in gains)
        rate = expected / cost(uncached + j)
        if rate > best_rate * (1 + 1e-9):
            best_j, best_rate = j, rate
    return [o[:best_j] for o in orders]
