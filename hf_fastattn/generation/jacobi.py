"""Jacobi parallel decoding: greedy decoding, several tokens per forward pass, the same tokens.

Greedy decoding solves, one token at a time, the system

    y_1 = argmax p(. | x),  y_2 = argmax p(. | x, y_1),  ...,  y_m = argmax p(. | x, y_1..y_{m-1})

Santilli et al. (2023) note that this is a fixed-point problem and solve it by Jacobi iteration instead: guess the
whole block y_1..y_m, run *one* forward over it (a causal model scores every position in parallel), replace each
guess by the argmax at its position, repeat. The first position is always right after one iteration, the second after
at most two, ...: the fixed point is exactly the greedy output, reached in at most m forwards, usually fewer when
later guesses happen to be right already.

This file implements that idea for decoder-only Hugging Face models, as a `custom_generate` callable:

    out = model.generate(input_ids, max_new_tokens=64, custom_generate=jacobi_decoding, mode="lookahead")

One *pass* of every mode is the same (`verify.accept_greedy`, `rollback.rollback`):

    1. the guesser proposes guesses g_1..g_k for the next k positions (k may be 0: a plain greedy step);
    2. one forward over [tokens not yet in the K/V cache (at least the last committed one), g_1..g_k];
    3. keep the greedy tokens that forward proves: t_0, then t_j for as long as g_j == t_{j-1} (1 to k + 1 tokens);
    4. take the rejected guesses back out of the cache (crop K/V; restore a recurrent state);
    5. show the guesser the model's predictions at every position: the next guesses.

The modes differ only in step 1:

    "jacobi"     the window covers all remaining new tokens (up to `max_new_tokens`, or `block_size`); each pass
                 re-guesses the unconverged part with the previous pass's predictions (plain Jacobi iteration).
    "gs_jacobi"  Gauss-Seidel-Jacobi: blocks of `block_size` tokens; Jacobi iterations on one block until it has
                 converged (it is then in the cache), then the next block starts.
    "hybrid"     a sliding window of `block_size` guesses that moves on as soon as a prefix converges and stops at
                 EOS or any stopping criterion: GS-Jacobi for outputs of unknown length.
    "lookahead"  Fu et al. (2024): guesses come from an n-gram pool (n-grams of the prompt and of the text generated
                 so far, "prompt lookup", plus n-grams collected from the Jacobi trajectories), extended by Jacobi
                 guesses; the best candidate per row is verified in the same forward.

No mode needs the output length in advance; every mode checks EOS and stopping criteria token by token, so all of
them stop exactly where greedy decoding stops. With `adaptive=True` (default) the number of guesses per pass halves
when none was accepted and doubles when all were, so a mode whose guesses are poor costs about one greedy step per
token instead of a wide forward per token.

Recurrent caches (linear attention): their state cannot be cut back, so before a speculative forward their layers
are copied and, if a guess was rejected, put back; the accepted tokens are then fed again at the start of the next
pass (in a separate forward, since a recurrent layer only returns its final state). See `rollback.py`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..integration.cache import cache_argument, pop_cache
from .rollback import needs_snapshot, rollback, snapshot
from .verify import accept_greedy

MODES = ("jacobi", "gs_jacobi", "hybrid", "lookahead")


@dataclass
class JacobiDecoderOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus the work done.

    Args:
        num_forward_passes (`int`): model forwards, the prompt's included (greedy needs one per new token).
        accepted_per_pass (`list[int]`): tokens committed by each forward, in order (each >= 1, except 0 for a
            forward that only re-fed accepted tokens into a recurrent state).
    """

    num_forward_passes: int | None = None
    accepted_per_pass: list[int] | None = None


# --------------------------------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------------------------------


def jacobi_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    *,
    mode: str = "lookahead",
    block_size: int | None = None,
    max_iterations: int | None = None,
    ngram_size: int = 4,
    adaptive: bool = True,
    jacobi_streamer=None,
    jacobi_trace: list | None = None,
    **model_kwargs,
):
    """Greedy decoding by Jacobi iteration; pass it as `model.generate(..., custom_generate=jacobi_decoding)`.

    `generate` prepares the inputs (attention mask, position ids, cache, logits processors, stopping criteria) and
    then calls this function; keyword arguments below that `generate` does not know are routed here.

    Args:
        model: a decoder-only `PreTrainedModel` that can generate.
        input_ids (`torch.LongTensor` of shape `[B, P]`): the (left-padded) prompts.
        mode (`str`): "jacobi", "gs_jacobi", "hybrid" or "lookahead" (see the module docstring).
        block_size (`int`, *optional*): guesses per pass (the block for "gs_jacobi", the window for "hybrid" and
            "lookahead"; for "jacobi" a cap on the window, which is otherwise all remaining new tokens).
            Defaults: 16 for "gs_jacobi"/"hybrid", 12 for "lookahead".
        max_iterations (`int`, *optional*): at most this many Jacobi passes on one block/window position; after that
            the block is finished with plain greedy steps (exactness is unaffected).
        ngram_size (`int`): n of the lookahead n-gram pool (the pool is keyed by the last `ngram_size - 1` tokens).
        adaptive (`bool`): shrink the guess window when guesses are rejected and grow it when accepted.
        jacobi_streamer: a streamer (`TextStreamer`...) fed the prompt and then every new token in order; the same
            as `generate(streamer=...)`, which transformers 5.x does not hand to a custom_generate callable (we pick
            it up from the calling `generate` frame; this argument is the explicit way).
        jacobi_trace (`list`, *optional*): if given, one dict per forward is appended (positions, guesses,
            predictions, confidences, accepted count): the data DDGviz draws.

    Returns:
        `torch.LongTensor` `[B, P + new]` equal to `generate(do_sample=False)`, or a `JacobiDecoderOutput` with
        `num_forward_passes` and `accepted_per_pass` when `return_dict_in_generate=True`.
    """
    _check_model(model)
    if generation_config is None:  # called directly: let generate prepare everything and call us back
        return model.generate(
            input_ids,
            custom_generate=jacobi_decoding,
            mode=mode,
            block_size=block_size,
            max_iterations=max_iterations,
            ngram_size=ngram_size,
            adaptive=adaptive,
            jacobi_streamer=jacobi_streamer or streamer,
            jacobi_trace=jacobi_trace,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **model_kwargs,
        )
    _check_config(generation_config, mode)
    if streamer is None and jacobi_streamer is not None:
        streamer = jacobi_streamer
        streamer.put(input_ids.cpu())  # generate() does this only for its own `streamer` argument
    elif streamer is None:
        streamer = _streamer_from_generate()

    # --- state: committed tokens, their attention mask and positions, and the cache -----------------------------
    ids = input_ids
    batch, prompt_len = ids.shape
    mask = model_kwargs.pop("attention_mask", None)  # [B, L] or None when there is no padding
    positions = model_kwargs.pop("position_ids", None)  # [B, L]
    if positions is None:
        positions = (
            (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(prompt_len)[None]
        )
    positions = positions.expand(batch, -1)
    # transformers >= 5.24 names the cache `cache` (earlier 5.x: `past_key_values`)
    cache = pop_cache(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config)
    for key in ("use_cache", "logits_to_keep", "cache_position"):
        model_kwargs.pop(key, None)
    cached = 0  # committed tokens whose K/V (or state) is in the cache; the rest are fed again
    keep_logits = model._supports_logits_to_keep() if hasattr(model, "_supports_logits_to_keep") else False

    pad_token_id = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    max_length = stopping_criteria.max_length or generation_config.max_length
    unfinished = torch.ones(batch, dtype=torch.long, device=ids.device)
    guesser = _make_guesser(mode, block_size, max_iterations, ngram_size, adaptive, prompt_len)
    guesser.start(ids)
    passes, accepted_per_pass = 0, []

    while unfinished.max() > 0:
        # 1. guesses for the next positions; the forward scores k + 1 positions, which must stay within max_length
        room = max_length - ids.shape[1]
        guesses = guesser.propose(ids, max_guesses=max(room - 1, 0))  # [B, k]
        k = guesses.shape[1]

        # a recurrent cache must hold every committed token but the last before it can be snapshotted
        saved = None
        if needs_snapshot(cache) and cached < ids.shape[1] - 1:
            commit_mask = None if mask is None else mask[:, :-1]
            _forward(
                model,
                ids[:, cached:-1],
                positions[:, cached:-1],
                commit_mask,
                cache,
                1,
                keep_logits,
                model_kwargs,
            )
            cached = ids.shape[1] - 1
            passes += 1
            accepted_per_pass.append(0)
        if needs_snapshot(cache) and k > 0:
            saved = snapshot(cache)

        # 2. one forward over the uncached committed tokens and the guesses
        fed = torch.cat([ids[:, cached:], guesses], dim=-1)
        fed_positions = torch.cat(
            [positions[:, cached:], positions[:, -1:] + torch.arange(1, k + 1, device=ids.device)], dim=-1
        )
        fed_mask = None if mask is None else torch.cat([mask, mask.new_ones(batch, k)], dim=-1)
        logits = _forward(model, fed, fed_positions, fed_mask, cache, k + 1, keep_logits, model_kwargs)
        passes += 1
        in_cache = cached + fed.shape[1]

        # 3. commit the tokens greedy decoding agrees with (at least one)
        old_len = ids.shape[1]
        ids, unfinished, n = accept_greedy(
            ids,
            guesses,
            logits,
            logits_processor,
            stopping_criteria,
            unfinished,
            pad_token_id,
            has_eos,
            streamer,
        )
        accepted_per_pass.append(n)
        new_len = ids.shape[1]
        positions = torch.cat(
            [positions, positions[:, -1:] + torch.arange(1, n + 1, device=ids.device)], dim=-1
        )
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, n)], dim=-1)

        # 4. forget the rejected guesses: the cache keeps committed tokens only (all but the newest one)
        if saved is not None:
            if n == k + 1:  # everything accepted: the state after the forward is the right one
                cached = in_cache
            else:
                rollback(
                    cache, k + 1, saved
                )  # back to before the guesses; accepted ones are re-fed next pass
                cached = old_len - 1
        else:
            rollback(cache, in_cache - (new_len - 1))
            cached = new_len - 1

        # 5. the model's own predictions at every position are the next guesses (the Jacobi update)
        predictions = logits.argmax(-1)  # [B, k + 1]
        guesser.observe(ids, guesses, predictions, n)
        if jacobi_trace is not None:
            confidence = logits.softmax(-1).amax(-1)  # [B, k + 1]
            jacobi_trace.append(
                {
                    "start": old_len,  # position predicted by predictions[:, 0]
                    "guesses": guesses.cpu(),
                    "predictions": predictions.cpu(),
                    "confidence": confidence.cpu(),
                    "accepted": n,
                }
            )

    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return JacobiDecoderOutput(
            sequences=ids,
            past_key_values=cache if generation_config.use_cache else None,
            num_forward_passes=passes,
            accepted_per_pass=accepted_per_pass,
        )
    return ids


def jacobi_generate(model, input_ids, *, streamer=None, **kwargs):
    """`model.generate(input_ids, custom_generate=jacobi_decoding, **kwargs)`, with `streamer` routed correctly."""
    return model.generate(input_ids, custom_generate=jacobi_decoding, jacobi_streamer=streamer, **kwargs)


def _streamer_from_generate():
    """The `streamer` given to the `generate` call that called us, if any.

    transformers 5.x puts the prompt into `generate(streamer=...)` but does not pass the streamer on to a callable
    `custom_generate` (it keeps only the keyword arguments `_sample` lacks), so without this the streamer would never
    see a new token nor `end()`. `generate` is our direct caller; its local `streamer` is the user's.
    """
    import sys

    frame = sys._getframe(2)  # 0: this function, 1: jacobi_decoding, 2: its caller
    if frame.f_code.co_name == "generate" and "custom_generate" in frame.f_locals:
        return frame.f_locals.get("streamer")
    return None


def _forward(model, tokens, positions, mask, cache, num_logits, keep_logits, extra) -> torch.Tensor:
    """One model forward; returns the fp32 logits of the last `num_logits` positions `[B, num_logits, V]`."""
    kwargs = {"logits_to_keep": num_logits} if keep_logits else {}
    out = model(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions,
        **{cache_argument(model): cache},
        use_cache=True,
        return_dict=True,
        **kwargs,
        **extra,
    )
    return out.logits[:, -num_logits:].float()


def _check_model(model) -> None:
    """Jacobi decoding reproduces greedy decoding of a decoder-only model; refuse anything else loudly."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "Jacobi decoding is not applicable to encoder-decoder models: it needs a decoder-only LM"
        )
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        raise ValueError(
            f"Jacobi decoding is not applicable to {type(model).__name__}: it needs a causal LM that can generate"
        )


def _check_config(generation_config, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a Jacobi decoding mode; choose one of {MODES}")
    if generation_config.do_sample:
        raise ValueError(
            "Jacobi decoding is greedy-only: do_sample=True is not supported (use do_sample=False)"
        )
    if generation_config.num_beams > 1:
        raise ValueError(f"Jacobi decoding is greedy-only: num_beams={generation_config.num_beams} must be 1")
    if generation_config.num_return_sequences > 1:
        raise ValueError("Jacobi decoding is greedy-only: num_return_sequences must be 1")
    if getattr(generation_config, "assistant_model", None) is not None:
        raise ValueError("Jacobi decoding does not combine with assisted generation")


# --------------------------------------------------------------------------------------------------------------------
# Guessers: where the guesses of step 1 come from
# --------------------------------------------------------------------------------------------------------------------


def _make_guesser(mode, block_size, max_iterations, ngram_size, adaptive, prompt_len):
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer")
    if ngram_size < 2:
        raise ValueError(f"ngram_size={ngram_size} must be at least 2")
    if mode == "lookahead":
        return LookaheadGuesser(block_size or 12, ngram_size, adaptive)
    return JacobiGuesser(mode, block_size, max_iterations, adaptive, prompt_len)


class JacobiGuesser:
    """Guesses for "jacobi", "gs_jacobi" and "hybrid": last pass's predictions, shifted past the accepted tokens.

    `trajectory[:, i]` is the current guess for position `L + i` (L = committed length): the prediction the model
    made for that position in the previous pass. Positions never predicted yet are filled with the last token
    (Santilli et al. use padding; any token is as good as a first guess).
    """

    def __init__(self, mode, block_size, max_iterations, adaptive, prompt_len):
        self.mode, self.prompt_len, self.adaptive = mode, prompt_len, adaptive
        self.block_size = block_size if block_size is not None else (None if mode == "jacobi" else 16)
        self.max_iterations = max_iterations
        self.trajectory = None  # [B, t]
        self.cap = self.block_size or 1 << 30  # adaptive window size
        self.block_id, self.iterations = None, 0

    def start(self, ids):
        self.trajectory = ids[:, :0]

    def window(self, ids, max_guesses: int) -> int:
        """Number of guesses k for the next pass (its forward then scores positions L .. L + k)."""
        length = ids.shape[1]
        if self.mode == "gs_jacobi":
            # the block holding position L; its last pass also yields the first token of the next block
            block = (length - self.prompt_len) // self.block_size
            k = self.prompt_len + (block + 1) * self.block_size - length
        else:
            block = length  # a sliding window: every position is a new "block" for max_iterations
            k = self.block_size or max_guesses
        if block != self.block_id:
            self.block_id, self.iterations = block, 0
        self.iterations += 1
        if self.max_iterations is not None and self.iterations > self.max_iterations:
            k = 0
        if self.adaptive:
            k = min(k, self.cap)
        return max(0, min(k, max_guesses))

    def propose(self, ids, max_guesses: int) -> torch.LongTensor:
        k = self.window(ids, max_guesses)
        guesses = self.trajectory[:, :k]
        if guesses.shape[1] < k:
            fill = ids[:, -1:].expand(-1, k - guesses.shape[1])
            guesses = torch.cat([guesses, fill], dim=-1)
        return guesses

    def observe(self, ids, guesses, predictions, n):
        k = guesses.shape[1]
        self.trajectory = predictions[:, n:]
        if self.adaptive and k > 0:
            accepted_guesses = n - 1
            if accepted_guesses >= k:
                self.cap = min(2 * self.cap, self.block_size or 1 << 30)
            elif accepted_guesses == 0:
                self.cap = max(1, self.cap // 2)


class NGramPool:
    """The next token after every context of 1 to `n - 1` tokens seen so far (newest wins), longest context first.

    Two sources: the committed text (prompt + output; "prompt lookup"), which is exact greedy text and often
    repeats, and the Jacobi trajectories, whose (guess, prediction) pairs are continuations the model produced in
    context. Chaining lookups gives a guessed continuation as long as the window.
    """

    def __init__(self, n: int):
        self.n = n
        self.table: dict[tuple[int, ...], int] = {}
        self.follow: dict[
            int, int
        ] = {}  # token -> the token the model predicted after it in a Jacobi trajectory

    def add_text(self, tokens: list[int], start: int = 0) -> None:
        """Index the contexts of every token of `tokens` from position `start` on."""
        for i in range(max(1, start), len(tokens)):
            for m in range(1, min(self.n - 1, i) + 1):
                self.table[tuple(tokens[i - m : i])] = tokens[i]

    def next_token(self, context: list[int]) -> int | None:
        for m in range(min(self.n - 1, len(context)), 0, -1):
            token = self.table.get(tuple(context[-m:]))
            if token is not None:
                return token
        return self.follow.get(context[-1]) if context else None

    def lookup(self, tokens: list[int], length: int) -> list[int]:
        """A guessed continuation of `tokens`, up to `length` tokens."""
        context, out = list(tokens[-(self.n - 1) :]), []
        while len(out) < length:
            token = self.next_token(context)
            if token is None:
                break
            out.append(token)
            context = context[1:] + [token] if len(context) >= self.n - 1 else context + [token]
        return out


class LookaheadGuesser:
    """Lookahead decoding: candidates from an n-gram pool, verified in the same forward, Jacobi guesses after them."""

    def __init__(self, block_size: int, ngram_size: int, adaptive: bool):
        self.block_size, self.ngram_size, self.adaptive = block_size, ngram_size, adaptive
        self.pools: list[NGramPool] = []
        self.indexed: list[int] = []
        self.trajectory = None
        self.cap = block_size
        self.stats = defaultdict(int)

    def start(self, ids):
        self.pools = [NGramPool(self.ngram_size) for _ in range(ids.shape[0])]
        self.indexed = [0] * ids.shape[0]
        self.trajectory = ids[:, :0]
        self._index_text(ids)

    def _index_text(self, ids):
        rows = ids.tolist()
        for b, row in enumerate(rows):
            self.pools[b].add_text(row, self.indexed[b])
            self.indexed[b] = len(row)

    def propose(self, ids, max_guesses: int) -> torch.LongTensor:
        k = min(self.cap if self.adaptive else self.block_size, max_guesses)
        if k == 0:
            return ids[:, :0]
        rows = ids.tolist()
        traj = self.trajectory.tolist()
        guesses = []
        for b, row in enumerate(rows):
            guess = self.pools[b].lookup(row, k)
            if not guess:
                guess = traj[b][:k]
            guess = guess + [row[-1]] * (k - len(guess))
            guesses.append(guess)
        return torch.tensor(guesses, dtype=ids.dtype, device=ids.device)

    def observe(self, ids, guesses, predictions, n):
        k = guesses.shape[1]
        self.trajectory = predictions[:, n:]
        self._index_text(ids)
        # (guess, prediction after it) pairs: the model's continuation of each guessed token, in context
        for b, (g, p) in enumerate(zip(guesses.tolist(), predictions.tolist(), strict=True)):
            follow = self.pools[b].follow
            for j in range(n - 1, k):
                follow[g[j]] = p[j + 1]
        if self.adaptive and k > 0:
            accepted_guesses = n - 1
            if accepted_guesses >= k:
                self.cap = min(2 * self.cap, self.block_size)
            elif accepted_guesses == 0:
                self.cap = max(1, self.cap // 2)
            elif accepted_guesses < k // 2:
                self.cap = max(1, math.ceil(self.cap * 3 / 4))
