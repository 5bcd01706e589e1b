"""Greedy verification of a guessed block: which guesses does greedy decoding agree with?

Feed `[last committed token, g_1, ..., g_k]` through the model in one forward. The logits at position j are the
model's next-token scores *given that g_1..g_j are right*. Greedy decoding would emit t_0 = argmax(logits_0) next;
if g_1 == t_0 the logits at position 1 are exactly the ones greedy decoding would see for its second token, so t_1 is
greedy's second token too, and so on until the first wrong guess. One forward therefore yields between 1 and k + 1
tokens, always exactly the greedy ones.

Logits processors (min_new_tokens, repetition penalty, ...), stopping criteria, EOS padding and the streamer are
applied token by token here, in the same order as transformers' `_sample`, which is what keeps the output identical
to `generate(do_sample=False)`.
"""

from __future__ import annotations

import torch


def accept_greedy(
    ids: torch.LongTensor,  # [B, L] committed tokens
    guesses: torch.LongTensor,  # [B, k]
    logits: torch.Tensor,  # [B, k + 1, V] fp32; logits[:, j] scores the token after guesses[:, :j]
    logits_processor,
    stopping_criteria,
    unfinished: torch.LongTensor,  # [B] 1 while a row is still generating
    pad_token_id: torch.Tensor | None,
    has_eos_stopping_criteria: bool,
    streamer=None,
) -> tuple[torch.LongTensor, torch.LongTensor, int]:
    """Commit the greedy tokens that one forward over `[last, *guesses]` proves, at least one.

    In a batch the block is accepted up to the first position where *any* unfinished row guessed wrong (every row
    advances by the same count, so the cache stays rectangular); finished rows receive `pad_token_id` as in `_sample`.

    Returns:
        `(ids [B, L + n], unfinished [B], n)` with n >= 1 the number of tokens appended.
    """
    k = guesses.shape[1]
    # without processors the scores are the logits: one argmax for the whole block instead of k + 1
    greedy_all = logits.argmax(-1) if len(logits_processor) == 0 else None  # [B, k + 1]
    n = 0
    for j in range(k + 1):
        if greedy_all is not None:
            token = greedy_all[:, j]
        else:
            token = logits_processor(ids, logits[:, j]).argmax(-1)
        if has_eos_stopping_criteria:
            token = token * unfinished + pad_token_id * (1 - unfinished)
        ids = torch.cat([ids, token[:, None]], dim=-1)
        n += 1
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished = unfinished & ~stopping_criteria(ids, None)
        # the next logits are valid only if the guess equals the token just committed, in every row still generating
        still_right = j < k and bool(((guesses[:, j] == token) | (unfinished == 0)).all())
        if unfinished.max() == 0 or not still_right:
            break
    return ids, unfinished, n
