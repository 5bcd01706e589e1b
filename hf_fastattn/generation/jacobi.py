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

One *pass* of every mode is the same (`verify.accept_greedy`, `rollback.py`):

    1. the guesser proposes guesses for the next positions: a chain g_1..g_k, or (lookahead) a tree of candidate
       continuations that share their prefixes; no guess at all makes the pass a plain greedy step;
    2. one forward over [tokens not yet in the K/V cache (at least the last committed one), guesses]; in a tree each
       guess attends only to the committed tokens and to its own ancestors (a 4D attention mask);
    3. keep the greedy tokens that forward proves: t_0, then t_j for as long as a guess equals t_{j-1};
    4. take the rejected guesses back out of the cache (crop K/V, or gather the accepted tree path; restore a
       recurrent state);
    5. show the guesser the model's predictions at every position: the next guesses.

The modes differ only in step 1:

    "jacobi"     the window covers all remaining new tokens (up to `max_new_tokens`, or `block_size`); each pass
                 re-guesses the unconverged part with the previous pass's predictions (plain Jacobi iteration).
    "gs_jacobi"  Gauss-Seidel-Jacobi: blocks of `block_size` tokens; Jacobi iterations on one block until it has
                 converged (it is then in the cache), then the next block starts.
    "hybrid"     a sliding window of `block_size` guesses that moves on as soon as a prefix converges and stops at
                 EOS or any stopping criterion: GS-Jacobi for outputs of unknown length.
    "lookahead"  after Fu et al. (2024): guesses come from an n-gram pool and several candidates are verified in
                 the same forward, as one token tree (their verification branch). The pool (`NGramPool`) holds the
                 committed text itself (prompt and output so far: the continuations after earlier occurrences of
                 its own suffix, "prompt lookup") and the model's own predictions after every context it has
                 seen (each prompt position, and every guess, rejected ones included: the n-grams their Jacobi
                 trajectories yield). There is no separate 2D Jacobi "lookahead branch" spending extra positions;
                 when the pool knows nothing about the newest token, the guess is the Jacobi update.

No mode needs the output length in advance; every mode checks EOS and stopping criteria token by token, so all of
them stop exactly where greedy decoding stops.

Adaptivity (`adaptive=True`, the default; Jacobi modes only). On a small trained model plain Jacobi fixes about one
token per forward (a guess conditioned on a wrong earlier guess is rarely right), while every guessed position makes
the forward dearer (on a CPU the second position alone costs ~10%). So the number of guesses per pass shrinks after
passes that accepted few or none and grows after passes that accepted all (`AdaptiveWindow`); when single guesses
keep failing it *rests*: the next passes make no guess at all, then it tries again after exponentially longer rests.
On such a model "jacobi", "gs_jacobi" and "hybrid" are therefore mostly greedy steps with an occasional probe: what
speed they have over `generate` comes from this loop being leaner than transformers' per-token loop (one forward,
one argmax, processors called directly, no per-step input preparation), not from Jacobi iteration. `adaptive=False`
keeps the textbook windows. Lookahead's tree is not adapted: it is bounded by `num_candidates` candidates of at most
`block_size` tokens, and built only from what the pool knows.

Trees need a cache whose accepted entries can be gathered (every layer a plain `DynamicLayer`) and plain causal
attention that takes an additive 4D mask ("sdpa", "eager"); otherwise lookahead verifies its best candidate only, as
a chain. Recurrent caches (linear attention): their state cannot be cut back, so before a speculative forward their
layers are copied and, if a guess was rejected, put back; the accepted tokens are then fed again at the start of the
next pass (in a separate forward, since a recurrent layer only returns its final state). See `rollback.py`.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..integration.cache import cache_argument, pop_cache
from .rollback import keep_path, needs_snapshot, rollback, snapshot, supports_tree
from .verify import accept_greedy, processor_function

MODES = ("jacobi", "gs_jacobi", "hybrid", "lookahead")
# transformers 5.24 renamed the output's `past_key_values` field to `cache`
_CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    else "past_key_values"
)


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


@dataclass
class Draft:
    """The guesses of one pass. `tokens[b, i]` is node i of row b: a chain (node i follows node i - 1, node 0 follows
    the last committed token) unless `ancestors` is given, which makes it a tree.

    Tree fields, per row: `depth` `[B, q]` (1 for a child of the last committed token), `ancestors` `[B, q, q]`
    (`[b, i, j]` iff node j is node i or one of its ancestors), `children` ({(node, token): child}, node -1 the last
    committed token) and `parents` (each node's parent, -1 the last committed token).
    """

    tokens: torch.LongTensor
    depth: torch.LongTensor | None = None
    ancestors: torch.BoolTensor | None = None
    children: list[dict] | None = None
    parents: list[list[int]] | None = None


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
    num_candidates: int = 4,
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
        block_size (`int`, *optional*): guesses per pass (the block for "gs_jacobi", the window for "hybrid", the
            depth of each candidate for "lookahead"; for "jacobi" a cap on the window, which is otherwise all
            remaining new tokens). Defaults: 16 for "gs_jacobi"/"hybrid", 12 for "lookahead".
        max_iterations (`int`, *optional*): at most this many Jacobi passes on one block/window position; after that
            the block is finished with plain greedy steps (exactness is unaffected).
        ngram_size (`int`): lookahead's n-grams: contexts of up to `ngram_size - 1` tokens.
        num_candidates (`int`): lookahead candidates verified per pass, as one token tree (1: a chain).
        adaptive (`bool`): Jacobi modes: shrink the guess window when guesses are rejected (down to no guess at all
            for a while), grow it when they are accepted (see the module docstring).
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
    _check_inputs(input_ids, block_size)
    if generation_config is None:  # called directly: let generate prepare everything and call us back
        return model.generate(
            input_ids,
            custom_generate=jacobi_decoding,
            mode=mode,
            block_size=block_size,
            max_iterations=max_iterations,
            ngram_size=ngram_size,
            num_candidates=num_candidates,
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

    # --- state: committed tokens ids[:, :length], the positions and padding mask of every slot, the cache --------
    batch, prompt_len = input_ids.shape
    max_length = stopping_criteria.max_length or generation_config.max_length
    new_slots = max_length - prompt_len
    ids = input_ids.new_zeros(batch, max_length)  # the output buffer; accepted tokens are written into it
    ids[:, :prompt_len] = input_ids
    length = prompt_len
    mask = model_kwargs.pop("attention_mask", None)  # [B, P] or None
    positions = model_kwargs.pop("position_ids", None)  # [B, P]
    if positions is None:
        positions = (
            (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(prompt_len)[None]
        )
    positions = positions.to(ids.device).expand(batch, -1)
    positions = torch.cat(
        [positions, positions[:, -1:] + torch.arange(1, new_slots + 1, device=ids.device)], -1
    )
    if mask is not None:  # an all-ones mask is no mask: let the model build its causal mask alone
        mask = None if bool(mask.all()) else torch.cat([mask, mask.new_ones(batch, new_slots)], dim=-1)

    # transformers >= 5.24 names the cache `cache` (earlier 5.x: `past_key_values`)
    cache = pop_cache(model_kwargs)
    if cache is None:
        cache = DynamicCache(config=model.config)
    for key in ("use_cache", "logits_to_keep", "cache_position"):
        model_kwargs.pop(key, None)
    cached = 0  # committed tokens whose K/V (or state) is in the cache; the rest are fed again
    forward = _Forward(model, cache, model_kwargs)
    # trees (and our own 4D masks) need K/V we can gather and plain causal attention that takes an additive 4D mask
    trees = (
        supports_tree(cache)
        and model.config._attn_implementation in ("sdpa", "eager")
        and getattr(model.config, "sliding_window", None) is None
    )

    process = processor_function(logits_processor)
    pad_token_id = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(batch, dtype=torch.long, device=ids.device)
    guesser = _make_guesser(mode, block_size, max_iterations, ngram_size, num_candidates, adaptive, trees)
    guesser.start(ids[:, :length])
    passes, accepted_per_pass = 0, []

    while unfinished.max() > 0:
        # 1. guesses for the next positions; the forward scores up to depth + 1 positions, which must fit
        draft = guesser.propose(ids[:, :length], max_depth=max(max_length - length - 1, 0))
        q = draft.tokens.shape[1]

        # a recurrent cache must hold every committed token but the last before it can be snapshotted
        saved = None
        if needs_snapshot(cache) and cached < length - 1:
            commit_mask = None if mask is None else mask[:, : length - 1]
            forward(ids[:, cached : length - 1], positions[:, cached : length - 1], commit_mask, 1)
            cached = length - 1
            passes += 1
            accepted_per_pass.append(0)
        if needs_snapshot(cache) and q > 0:
            saved = snapshot(cache)

        # 2. one forward over the uncached committed tokens and the guesses
        fed = torch.cat([ids[:, cached:length], draft.tokens], dim=-1) if q > 0 else ids[:, cached:length]
        if draft.ancestors is None:  # a chain: the guesses take the next slots
            fed_positions = positions[:, cached : length + q]
        else:  # a tree: a guess sits one position after its parent and sees only its ancestors
            fed_positions = torch.cat(
                [positions[:, cached:length], positions[:, length - 1 : length] + draft.depth], -1
            )
        if trees and q > 0:
            fed_mask = _guess_mask(mask, cached, length, q, draft.ancestors, batch, model.dtype, ids.device)
        else:  # transformers builds the causal mask (one token, or an attention we do not know)
            fed_mask = None if mask is None else mask[:, : length + q]
        # logits after the guesses and the last committed token, and after up to `learns_from` earlier fed tokens
        num_logits = q + 1 + min(fed.shape[1] - q - 1, guesser.learns_from)
        logits = forward(fed, fed_positions, fed_mask, num_logits)
        passes += 1

        # 3. commit the tokens greedy decoding agrees with (at least one)
        old_len = length
        n, path, unfinished = accept_greedy(
            ids,
            length,
            draft.tokens,
            draft.children,
            logits[:, -(q + 1) :],
            process,
            stopping_criteria,
            unfinished,
            pad_token_id,
            has_eos,
            streamer,
        )
        length += n
        accepted_per_pass.append(n)

        # 4. forget the rejected guesses: the cache keeps committed tokens only (all but the newest one)
        if saved is not None:
            if n == q + 1:  # everything accepted: the state after the forward is the right one
                cached = old_len + q
            else:  # back to before the guesses; the accepted ones are re-fed next pass
                rollback(cache, q + 1, saved)
                cached = old_len - 1
        else:
            first_branch = draft.children is None or all(p == list(range(n - 1)) for p in path)
            if first_branch:  # the accepted guesses are nodes 0, 1, ...: they precede the rejected ones
                rollback(cache, q - (n - 1))
            else:
                keep_path(cache, old_len, path)
            cached = length - 1

        # 5. the model's own predictions at every position are the next guesses (the Jacobi update)
        guesser.observe(ids[:, :length], draft, logits, n, path)
        if jacobi_trace is not None:
            jacobi_trace.append(_trace_record(old_len, draft, logits[:, -(q + 1) :], path, n))

    if streamer is not None:
        streamer.end()
    ids = ids[:, :length].contiguous()
    if generation_config.return_dict_in_generate:
        return JacobiDecoderOutput(
            sequences=ids,
            num_forward_passes=passes,
            accepted_per_pass=accepted_per_pass,
            **{_CACHE_FIELD: cache if generation_config.use_cache else None},
        )
    return ids


def jacobi_generate(model, input_ids, *, streamer=None, **kwargs):
    """`model.generate(input_ids, custom_generate=jacobi_decoding, **kwargs)`, with `streamer` routed correctly.

    Bad inputs raise `ValueError` before any forward: an empty prompt (`input_ids` of shape `[B, 0]`; greedy
    `generate` fails inside the model on one), a `block_size` below 1, and, from `generate`'s own checks,
    `max_new_tokens` below 1 (transformers refuses `max_new_tokens=0` rather than returning the prompt; so do we).
    """
    _check_inputs(input_ids, kwargs.get("block_size"))
    return model.generate(input_ids, custom_generate=jacobi_decoding, jacobi_streamer=streamer, **kwargs)


class _Forward:
    """One model forward with the cache; returns the fp32 logits of the last `num_logits` positions `[B, n, V]`."""

    def __init__(self, model, cache, extra_kwargs):
        self.model = model
        self.kwargs = dict(extra_kwargs, use_cache=True, return_dict=True)
        self.kwargs[cache_argument(model)] = cache  # looked up once: inspecting the signature costs ~0.1 ms
        self.keep_logits = (
            model._supports_logits_to_keep() if hasattr(model, "_supports_logits_to_keep") else False
        )

    def __call__(self, tokens, positions, mask, num_logits: int) -> torch.Tensor:
        keep = {"logits_to_keep": num_logits} if self.keep_logits else {}
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, **keep, **self.kwargs)
        return out.logits[:, -num_logits:].float()


def _guess_mask(
    padding, cached: int, length: int, q: int, ancestors, batch: int, dtype, device
) -> torch.Tensor:
    """The additive 4D attention mask `[B, 1, u + q, length + q]` of a forward over the u = length - cached uncached
    committed tokens and q guesses: committed tokens attend causally; a guess attends to every committed token and
    to its ancestors (`ancestors` `[B, q, q]`; None for a chain: the guesses before it). `padding` `[B, >= length]`
    is the padding mask (None: no padding). Building it here skips transformers' mask construction (~0.1 ms)."""
    blocked = torch.finfo(dtype).min
    u = length - cached
    additive = torch.zeros(batch, 1, u + q, length + q, dtype=dtype, device=device)
    additive[:, :, :, cached:] = torch.full((u + q, u + q), blocked, dtype=dtype, device=device).triu_(
        1
    )  # causal
    if ancestors is not None:
        tree = torch.zeros(ancestors.shape, dtype=dtype, device=device).masked_fill_(~ancestors, blocked)
        additive[:, 0, u:, length:] = tree
    if padding is not None:
        additive[:, :, :, :length].masked_fill_(~padding[:, None, None, :length].bool(), blocked)
    return additive


def _trace_record(start, draft, logits, path, n) -> dict:
    """What DDGviz draws of one pass: guesses, predictions and confidences along a chain of positions starting at
    `start` (for a tree: the accepted path, then the first children after it)."""
    nodes = list(range(draft.tokens.shape[1]))
    if draft.parents is not None:  # follow row 0's accepted path, then the lowest-numbered children
        nodes = list(path[0])
        while True:
            node = nodes[-1] if nodes else -1
            child = next((c for c, parent in enumerate(draft.parents[0]) if parent == node), None)
            if child is None:
                break
            nodes.append(child)
    index = torch.tensor([-1, *nodes]) + 1  # logits row 0 is the last committed token
    predictions = logits.argmax(-1)
    return {
        "start": start,  # position predicted by predictions[:, 0]
        "guesses": draft.tokens[:, nodes].cpu(),
        "predictions": predictions[:, index].cpu(),
        "confidence": logits[:, index].softmax(-1).amax(-1).cpu(),
        "accepted": n,
    }


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


def _check_inputs(input_ids, block_size) -> None:
    """Refuse what would otherwise fail deep inside the decoding loop with a shape error."""
    if input_ids is not None:  # None: `generate` starts from the BOS token
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a LongTensor of shape [batch, prompt_length], got {shape}")
        if input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has no tokens (shape {tuple(input_ids.shape)}): Jacobi decoding continues a prompt of at "
                "least one token (e.g. the BOS token; or pass input_ids=None to start from generation_config's BOS); "
                "prompts given as inputs_embeds alone are not supported"
            )
    if block_size is not None:
        try:
            valid = not isinstance(block_size, bool) and operator.index(block_size) >= 1
        except TypeError:  # 2.5, "4": not an integer
            valid = False
        if not valid:
            raise ValueError(
                f"block_size={block_size!r} must be a positive integer (or None for the mode's default)"
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


def _make_guesser(mode, block_size, max_iterations, ngram_size, num_candidates, adaptive, trees):
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer")
    if ngram_size < 2:
        raise ValueError(f"ngram_size={ngram_size} must be at least 2")
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates} must be a positive integer")
    if mode == "lookahead":
        return LookaheadGuesser(block_size or 12, ngram_size - 1, num_candidates if trees else 1)
    return JacobiGuesser(mode, block_size, max_iterations, adaptive)


class AdaptiveWindow:
    """The number of guesses per pass (`adaptive=False`: always the mode's own).

    Doubled after a pass that accepted all its guesses (at most `limit`), cut to twice the accepted ones after a
    pass that accepted some, half the guesses made after a pass that accepted none. When even single
    guesses keep failing (two passes in a row) it rests: the next `rest` passes make no guess (plain greedy steps),
    then it tries one guess again; `rest` doubles (up to `max_rest`) every time that try fails and drops back to 1
    as soon as a guess is accepted.
    """

    def __init__(self, limit: int, adaptive: bool, max_rest: int = 64):
        self.limit, self.adaptive, self.max_rest = limit, adaptive, max_rest
        self.size, self.misses, self.rest, self.resting = limit, 0, 1, 0

    def __call__(self, k: int) -> int:
        if not self.adaptive:
            return k
        if self.resting > 0:
            self.resting -= 1
            return 0
        return min(k, self.size)

    def update(self, guesses: int, accepted_guesses: int) -> None:
        if guesses == 0:
            return
        if accepted_guesses > 0:
            self.misses, self.rest = 0, 1
            if accepted_guesses >= guesses:
                self.size = min(2 * self.size, self.limit)
            else:
                self.size = min(self.size, 2 * accepted_guesses)
        elif min(self.size, guesses) > 1:
            self.size = min(self.size, guesses) // 2
        else:  # a single guess failed; the first one after a rest has no trajectory to come from: allow one miss
            self.misses += 1
            if self.misses >= 2:
                self.misses, self.resting, self.rest = 0, self.rest, min(2 * self.rest, self.max_rest)


class JacobiGuesser:
    """Guesses for "jacobi", "gs_jacobi" and "hybrid": last pass's predictions, shifted past the accepted tokens.

    `trajectory[:, i]` is the current guess for position `L + i` (L = committed length): the prediction the model
    made for that position in the previous pass. Positions never predicted yet are filled with the last token
    (Santilli et al. use padding; any token is as good as a first guess).
    """

    learns_from = 0  # predictions wanted after committed tokens other than the last one

    def __init__(self, mode, block_size, max_iterations, adaptive):
        self.mode, self.max_iterations = mode, max_iterations
        self.block_size = block_size if block_size is not None else (None if mode == "jacobi" else 16)
        self.window = AdaptiveWindow(self.block_size or 1 << 30, adaptive)
        self.trajectory = None  # [B, t]
        self.prompt_len, self.block_id, self.iterations = 0, None, 0

    def start(self, ids):
        self.trajectory, self.prompt_len = ids[:, :0], ids.shape[1]

    def num_guesses(self, length: int, max_depth: int) -> int:
        """Number of guesses k for the next pass (its forward then scores positions L .. L + k)."""
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
        return max(0, min(self.window(k), max_depth))

    def propose(self, ids, max_depth: int) -> Draft:
        k = self.num_guesses(ids.shape[1], max_depth)
        guesses = self.trajectory[:, :k]
        if guesses.shape[1] < k:
            guesses = torch.cat([guesses, ids[:, -1:].expand(-1, k - guesses.shape[1])], dim=-1)
        return Draft(guesses)

    def observe(self, ids, draft, logits, n, path):
        q = draft.tokens.shape[1]
        self.trajectory = (
            logits[:, n:].argmax(-1) if n <= q else ids[:, :0]
        )  # the predictions past the accepted
        self.window.update(q, n - 1)


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

    def continuations(self, depths: list[int]) -> list[list[int]]:
        """Distinct continuations, the most trusted first, the i-th at most `depths[i]` tokens long."""
        text, found = self.tokens, []
        for m in range(min(self.max_match, len(text)), 0, -1):
            for end in reversed(self.ends.get(tuple(text[-m:]), ())):
                continuation = text[end : end + depths[len(found)]]
                if continuation and continuation not in found:
                    found.append(continuation)
                    if len(found) == len(depths):
                        return found
        return found


class NGramPool:
    """One row's n-gram pool: the committed text, and the model's own predictions.

    The text (prompt and output so far, exactly greedy) gives whole continuations (`SuffixIndex`). `predicted` maps
    contexts of 1..`max_match` tokens to the token the model predicted after them, at every position of every
    forward: the prompt's positions in the first one, and every guess, rejected ones included (a guessed context is
    still one the model continued: the n-grams of Fu et al.'s Jacobi trajectories). Chaining those lookups gives one
    more candidate, which is what guesses a token the text has never been followed by.
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

    def candidates(self, depths: list[int]) -> list[list[int]]:
        """The model's predicted chain (the deepest, `depths[0]`), then continuations from the text."""
        chain = self.predicted_chain(depths[0])
        found = [chain] if chain else []
        for continuation in self.text.continuations(depths[1:]) if len(depths) > 1 else []:
            if continuation not in found:
                found.append(continuation)
        return found


class LookaheadGuesser:
    """Lookahead decoding: candidate continuations from each row's `NGramPool`, merged into one token tree.

    Candidate i is at most `depth // (i + 1)` tokens long (the best-trusted ones are the likeliest to be accepted
    far: 12, 6, 4, 3 for the defaults), which keeps the tree near twice `depth` nodes. When the pool knows nothing
    about the newest token, the guess is the Jacobi update: the predictions made after the first rejected guess and
    its first descendants in the last pass.
    """

    learns_from = 256  # the model's predictions after (up to) the last 256 prompt tokens seed the pool

    def __init__(self, depth: int, max_match: int, num_candidates: int):
        self.depth, self.max_match, self.num_candidates = depth, max_match, num_candidates
        self.pools: list[NGramPool] = []
        self.trajectory: list[list[int]] = []

    def start(self, ids):
        self.pools = [NGramPool(self.max_match) for _ in range(ids.shape[0])]
        for pool, row in zip(self.pools, ids.tolist(), strict=True):
            pool.text.extend(row)
        self.trajectory = [[] for _ in self.pools]

    def propose(self, ids, max_depth: int) -> Draft:
        depth = min(self.depth, max_depth)
        if depth == 0:
            return Draft(ids[:, :0])
        depths = [max(1, depth // (i + 1)) for i in range(self.num_candidates)]
        candidates = []
        for pool, trajectory in zip(self.pools, self.trajectory, strict=True):
            found = pool.candidates(depths)
            candidates.append(found or ([trajectory[:depth]] if trajectory else []))
        return build_draft(candidates, filler=ids[:, -1].tolist(), device=ids.device)

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


def build_draft(candidates: list[list[list[int]]], filler: list[int], device=None) -> Draft:
    """Merge each row's candidate continuations into a token tree (shared prefixes once) and pad the rows to one
    size; a single candidate per row gives a chain. Node order: the first candidate's tokens are nodes 0, 1, ..."""
    if all(len(rows) <= 1 for rows in candidates):
        width = max((len(rows[0]) for rows in candidates if rows), default=0)
        chains = [(rows[0] if rows else []) for rows in candidates]
        tokens = [chain + [fill] * (width - len(chain)) for chain, fill in zip(chains, filler, strict=True)]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=device).view(len(candidates), width))
    trees = []  # per row: (tokens, depths, ancestor lists, children, parents)
    for rows in candidates:
        tokens, depths, lineage, children, parents = [], [], [], {}, []
        for candidate in rows:
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
                node = child
        trees.append((tokens, depths, lineage, children, parents))
    width = max(len(tree[0]) for tree in trees)
    batch = len(trees)
    ancestors = torch.zeros(batch, width, width, dtype=torch.bool)
    token_rows, depth_rows = [], []
    for b, (tokens, depths, lineage, _, _) in enumerate(trees):
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
    )
