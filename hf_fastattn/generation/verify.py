"""Greedy verification of guessed tokens: which guesses does greedy decoding agree with?

Feed `[last committed token, g_1, ..., g_k]` through the model in one forward. The logits at position j are the
model's next-token scores *given that g_1..g_j are right*. Greedy decoding would emit t_0 = argmax(logits_0) next;
if g_1 == t_0 the logits at position 1 are exactly the ones greedy decoding would see for its second token, so t_1 is
greedy's second token too, and so on until the first wrong guess. One forward therefore yields between 1 and k + 1
tokens, always exactly the greedy ones.

The same holds for a *tree* of guesses (several candidate continuations sharing prefixes, each token attending only
to its ancestors): after committing t_j, walk to the child whose token is t_j, if there is one. A chain is the tree in
which node j's only child is node j + 1.

Logits processors (min_new_tokens, repetition penalty, ...), stopping criteria, EOS padding and the streamer are
applied token by token here, in the same order as transformers' `_sample`, which is what keeps the output identical
to `generate(do_sample=False)`.
"""

from __future__ import annotations

import inspect

import torch


def processor_function(logits_processor):
    """`logits_processor` as a plain `(ids, scores) -> scores` function, or None when there is no processor.

    `LogitsProcessorList.__call__` inspects every processor's signature on every call (tens of microseconds a
    token); a processor that takes only `(input_ids, scores)` can be called directly, which is what the list does
    for it anyway. Lists with other processors are returned unchanged.
    """
    if logits_processor is None or len(logits_processor) == 0:
        return None
    if any(len(inspect.signature(p.__call__).parameters) > 2 for p in logits_processor):
        return logits_processor
    processors = list(logits_processor)

    def process(ids, scores):
        for processor in processors:
            scores = processor(ids, scores)
        return scores

    return process


def accept_greedy(
    ids: torch.LongTensor,  # [B, max_length] buffer; the first `length` columns are committed
    length: int,
    guesses: torch.LongTensor,  # [B, q] guessed tokens (nodes of a chain or a tree)
    children: list[dict] | None,  # per row {(node, token): child node}, node -1 the root; None for a chain
    logits: torch.Tensor,  # [B, q + 1, V]; [:, 0] scores the token after the root, [:, 1 + i] after node i
    process,  # `processor_function(...)` or None
    stopping_criteria,
    unfinished: torch.LongTensor,  # [B] 1 while a row is still generating
    pad_token_id: torch.Tensor | None,
    has_eos_stopping_criteria: bool,
    streamer=None,
) -> tuple[int, list[list[int]], torch.LongTensor]:
    """Commit the greedy tokens that one forward over the root and the guesses proves, at least one.

    The tokens are written into `ids[:, length:length + n]`. In a batch every row advances by the same count n (the
    cache stays rectangular): acceptance stops at the first token that any row cannot continue, except rows that
    are finished and receive `pad_token_id` from then on (with an EOS criterion, as in `_sample`); without an EOS
    criterion a finished row keeps receiving greedy tokens until every row is finished, so it must be exact too.

    Returns:
        `(n, path, unfinished)`: n >= 1 tokens committed, `path[b]` the n - 1 guess nodes row b kept (their K/V is
        in the cache; for a padded finished row any valid nodes), and the updated `unfinished`.
    """
    batch, q = guesses.shape
    rows = range(batch)
    guess_lists = guesses.tolist()
    # without processors the scores are the logits: one argmax for all positions instead of one per token
    greedy = logits.argmax(-1).tolist() if process is None else None
    running = unfinished.tolist()
    node = [-1] * batch  # the node of each row whose logits give the next token (-1: the root)
    path: list[list[int]] = [[] for _ in rows]
    n = 0
    while True:
        if greedy is not None:
            tokens = [greedy[b][node[b] + 1] for b in rows]
            token = torch.tensor(tokens, device=ids.device)
        else:
            if all(i == node[0] for i in node):  # (plain indexing is several times cheaper than a gather)
                scores = logits[:, node[0] + 1]
            else:
                scores = logits[torch.arange(batch), torch.tensor(node) + 1]
            token = process(ids[:, : length + n], scores).argmax(-1)
            tokens = None
        if has_eos_stopping_criteria and not all(running):
            token = token * unfinished + pad_token_id * (1 - unfinished)
            tokens = None
        ids[:, length + n] = token
        n += 1
        if streamer is not None:
            streamer.put(token.cpu())
        stopped = stopping_criteria(ids[:, : length + n], None)
        if any(stopped.tolist()):  # (rare: no tensor ops on `unfinished` otherwise)
            unfinished = unfinished & ~stopped
            running = unfinished.tolist()
        if not any(running):
            break
        # the next logits are valid only if a guess equals the token just committed, in every row still generating
        tokens = token.tolist() if tokens is None else tokens
        following = []
        for b in rows:
            if children is None:
                child = node[b] + 1 if node[b] + 1 < q and guess_lists[b][node[b] + 1] == tokens[b] else None
            else:
                child = children[b].get((node[b], tokens[b]))
            if child is None and not running[b] and has_eos_stopping_criteria:
                child = min(node[b] + 1, q - 1)  # a padded finished row: its logits do not matter
            following.append(child)
        if q == 0 or None in following:
            break
        node = following
        for b in rows:
            path[b].append(node[b])
    return n, path, unfinished


def accept_sampled(
    ids: torch.LongTensor,
    length: int,
    guesses: torch.LongTensor,  # [B, q]
    parents: list[list[int]] | None,  # per row, each node's parent (-1: the root); None for a chain
    logits: torch.Tensor,  # [B, q + 1, V]
    process,
    stopping_criteria,
    unfinished: torch.LongTensor,
    pad_token_id: torch.Tensor | None,
    has_eos_stopping_criteria: bool,
    streamer=None,
    generator: torch.Generator | None = None,
) -> tuple[int, list[list[int]], torch.LongTensor]:
    """Commit sampled tokens that one forward over the root and the guesses yields, at least one; the sequence has
    exactly the distribution of plain sampling (`generate(do_sample=True)` with the same processors).

    At each step the processed scores of the current node give the distribution p of the next token. The guesses
    are a *deterministic* draft (a point mass on each child's token), for which the speculative-sampling rule
    (Leviathan et al., 2023; Chen et al., 2023) reads: accept child c with probability p(c); if rejected, the next
    token comes from the residual, p with c's mass removed and renormalized. With several children (a tree) the rule
    is applied to them in turn, each time to the residual of the previous ones (as SpecInfer does). Then
    P(token = c_i) = p(c_i) for each child and P(token = x) = p(x) for every other x: exactly p. An accepted child's
    logits are the next step's; a residual token ends the pass.

    Returns:
        `(n, path, unfinished)` as `accept_greedy`.
    """
    batch, q = guesses.shape
    rows = range(batch)
    guess_lists = guesses.tolist()
    kids = []  # per row: {node: [children in order]}
    for b in rows:
        row_parents = parents[b] if parents is not None else list(range(-1, q - 1))
        table: dict[int, list[int]] = {}
        for node, parent in enumerate(row_parents):
            table.setdefault(parent, []).append(node)
        kids.append(table)
    running = unfinished.tolist()
    node = [-1] * batch
    path: list[list[int]] = [[] for _ in rows]
    n = 0
    while True:
        if all(i == node[0] for i in node):
            scores = logits[:, node[0] + 1]
        else:
            scores = logits[torch.arange(batch), torch.tensor(node) + 1]
        if process is not None:
            scores = process(ids[:, : length + n], scores)
        probs = torch.softmax(scores.float(), dim=-1)
        tokens, following = [], []
        for b in rows:
            p = probs[b].clone()
            chosen = None
            for child in kids[b].get(node[b], ()):
                token = guess_lists[b][child]
                mass = float(p[token])
                total = float(p.sum())
                if total <= 0:
                    break
                if mass > 0 and _uniform(generator) * total < mass:
                    chosen = child
                    break
                if mass > 0:
                    p[token] = 0.0  # the residual: this child's mass removed (renormalized by multinomial)
            if chosen is not None:
                tokens.append(guess_lists[b][chosen])
            else:
                tokens.append(int(torch.multinomial(p, 1, generator=generator)))
            following.append(chosen)
        token = torch.tensor(tokens, device=ids.device)
        if has_eos_stopping_criteria and not all(running):
            token = token * unfinished + pad_token_id * (1 - unfinished)
        ids[:, length + n] = token
        n += 1
        if streamer is not None:
            streamer.put(token.cpu())
        stopped = stopping_criteria(ids[:, : length + n], None)
        if any(stopped.tolist()):
            unfinished = unfinished & ~stopped
            running = unfinished.tolist()
        if not any(running):
            break
        for b in rows:  # a finished, padded row follows any node: its logits do not matter
            if following[b] is None and not running[b] and has_eos_stopping_criteria:
                following[b] = min(node[b] + 1, q - 1)
        if q == 0 or None in following:
            break
        node = following
        for b in rows:
            path[b].append(node[b])
    return n, path, unfinished


def _uniform(generator: torch.Generator | None) -> float:
    """One draw of U(0, 1): the acceptance test of a draft token (a function, so a test can bias it)."""
    return float(torch.rand((), generator=generator))
