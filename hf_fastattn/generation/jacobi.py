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

The modes differ only in step 1, their guesser (`guessers.py`, behind an interface in the spirit of transformers'
`CandidateGenerator`): "jacobi" (plain Jacobi iteration over the remaining tokens), "gs_jacobi" (Gauss-Seidel
blocks of `block_size`), "hybrid" (a sliding window of `block_size` guesses; a Jacobi mode, unrelated to the
LoLCATs hybrid attention) and "lookahead" (after Fu et al. 2024: candidates from an n-gram pool and the committed
text, verified together as one token tree).

No mode needs the output length in advance; every mode checks EOS and stopping criteria token by token, so all of
them stop exactly where greedy decoding stops.

Cost-aware speculation (`adaptive=True`, the default; `speculation.py`). Step 1 proposes candidates; what a pass
verifies is chosen to maximize expected tokens per second: each candidate node's chance of acceptance comes from what
was accepted so far per source ("text:m" copies after an m-token suffix match, "predicted", "jacobi") and depth, and
the forward's cost from `ForwardCost`, t(tokens fed), measured for this model on this machine (a few timed forwards
on the first call, refined by every pass). A pass whose expected gain is below its cost makes no guess: a plain
greedy step. On a small trained model plain Jacobi guesses are rarely right, so "jacobi", "gs_jacobi" and "hybrid"
are then mostly greedy steps; lookahead copies from the prompt verify as deep as the acceptance so far makes worth
it. `adaptive=False` keeps the textbook windows (Jacobi modes) and every proposed node up to twice `block_size`
(lookahead). The forwards run under `fastpath.fast_verification` (a forward over a few tokens then costs about what
one token costs on a CPU: see there).

Sampling (`do_sample=True`, any mode, with the usual logits processors): the guesses are a deterministic draft, and
`verify.accept_sampled` applies the speculative-sampling rule for such a draft (accept a guess with its probability,
else draw from the residual), so the output has exactly the distribution of plain sampling.

Trees need a cache whose accepted entries can be gathered (every layer a plain `DynamicLayer`) and plain causal
attention that takes an additive 4D mask ("sdpa", "eager"); otherwise lookahead verifies its best candidate only, as
a chain. Recurrent caches (linear attention): their state cannot be cut back, so before a speculative forward their
layers are copied and, if a guess was rejected, put back; the accepted tokens are then fed again at the start of the
next pass (in a separate forward, since a recurrent layer only returns its final state). See `rollback.py`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..integration.cache import pop_cache
from .checks import check_config, check_inputs, check_model
from .draft import Draft, build_draft
from .fastpath import RowPlan, fast_verification
from .forward import Forward, guess_mask, timed_forward
from .guessers import MODES, Guesser, JacobiGuesser, LookaheadGuesser, NGramPool, SuffixIndex, make_guesser
from .rollback import growable_layers, keep_path, needs_snapshot, rollback, snapshot, supports_tree
from .speculation import AcceptanceStats, ForwardCost, Tree, plan
from .verify import accept_greedy, accept_sampled, processor_function

__all__ = [
    "MODES",
    "Draft",
    "Guesser",
    "JacobiDecoderOutput",
    "JacobiGuesser",
    "LookaheadGuesser",
    "NGramPool",
    "SuffixIndex",
    "build_draft",
    "jacobi_decoding",
    "jacobi_generate",
    "make_guesser",
]

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
    fast_path: bool = True,
    guesser: Guesser | None = None,
    **model_kwargs,
):
    """Greedy decoding (or sampling) by Jacobi iteration; pass it as `model.generate(..., custom_generate=jacobi_decoding)`.

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
        num_candidates (`int`): lookahead: continuations copied from the text proposed per pass (besides the
            predicted chain and the Jacobi trajectory); their token tree is what the cost model chooses nodes from.
        adaptive (`bool`): verify only the guesses worth their cost (expected tokens per second, from the acceptance
            observed so far and the measured forward cost; see the module docstring); False: every proposed guess.
        fast_path (`bool`): run the forwards under `fastpath.fast_verification` (CPU fast paths for few tokens).
        jacobi_streamer: a streamer (`TextStreamer`...) fed the prompt and then every new token in order; the same
            as `generate(streamer=...)`, which transformers 5.x does not hand to a custom_generate callable (we pick
            it up from the calling `generate` frame; this argument is the explicit way).
        jacobi_trace (`list`, *optional*): if given, one dict per forward is appended (positions, guesses,
            predictions, confidences, accepted count): the data DDGviz draws.
        guesser (`Guesser`, *optional*): where the guesses come from, instead of `mode`'s (`guessers.make_guesser`):
            any object with the `Guesser` interface (`start`, `get_candidates`, `update_candidate_strategy`,
            `max_nodes`, `learns_from`); it is started afresh. The output does not depend on it, only the speed.

    Returns:
        `torch.LongTensor` `[B, P + new]` equal to `generate(do_sample=False)` (with `do_sample=True`: distributed as
        `generate(do_sample=True)`'s), or a `JacobiDecoderOutput` with
        `num_forward_passes` and `accepted_per_pass` when `return_dict_in_generate=True`.
    """
    check_model(model)
    check_inputs(input_ids, block_size, guesser)
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
            fast_path=fast_path,
            guesser=guesser,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **model_kwargs,
        )
    check_config(generation_config, mode)
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
    forward = Forward(model, cache, model_kwargs)
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
    if guesser is None:
        guesser = make_guesser(mode, block_size, max_iterations, ngram_size, num_candidates)
    guesser.start(ids[:, :length])
    stats = AcceptanceStats.for_model(model)  # what guesses of each source and depth have been accepted so far
    cost = ForwardCost.for_model(model, batch)  # seconds of a forward over n tokens per row, on this machine
    sample = bool(generation_config.do_sample)
    passes, accepted_per_pass = 0, []

    # how the linear layers compute a forward over a few rows: measured below on the first pass (CPU only)
    row_plan = RowPlan.for_model(model, batch) if fast_path and model.device.type == "cpu" else None
    with fast_verification(model, row_plan, enabled=fast_path) as fast, growable_layers(cache if fast_path else None):
        forward.prepare = None if fast is None else fast.prepare
        cost.computed_tokens = None if row_plan is None else row_plan.computed_tokens
        while unfinished.max() > 0:
            # 1. candidates for the next positions; keep what is worth verifying (the forward scores up to depth + 1
            # positions, which must fit)
            pass_started = time.perf_counter()
            max_depth = max(max_length - length - 1, 0)
            proposals = guesser.get_candidates(ids[:, :length], max_depth)
            draft = _plan_draft(
                proposals, stats, cost, length - cached, guesser.max_nodes, not trees, adaptive, ids[:, :length]
            )
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
                fed_mask = guess_mask(mask, cached, length, q, draft.ancestors, batch, model.dtype, ids.device)
            else:  # transformers builds the causal mask (one token, or an attention we do not know)
                fed_mask = None if mask is None else mask[:, : length + q]
            # logits after the guesses and the last committed token, and after up to `learns_from` earlier tokens
            num_logits = q + 1 + min(fed.shape[1] - q - 1, guesser.learns_from)
            started = time.perf_counter()
            logits = forward(fed, fed_positions, fed_mask, num_logits)
            forward_seconds = time.perf_counter() - started
            on_clock = fed.shape[1] <= 128 and not logits.is_cuda  # (a GPU forward is asynchronous: not timed)
            if on_clock:
                cost.record(fed.shape[1], forward_seconds)
            passes += 1

            # 3. commit the tokens the forward proves (greedy), or samples (exactly plain sampling), at least one
            old_len, running_before = length, unfinished.tolist()
            if sample:
                n, path, unfinished = accept_sampled(
                    ids, length, draft.tokens, draft.parents, logits[:, -(q + 1) :], process,
                    stopping_criteria, unfinished, pad_token_id, has_eos, streamer,
                )  # fmt: skip
            else:
                n, path, unfinished = accept_greedy(
                    ids, length, draft.tokens, draft.children, logits[:, -(q + 1) :], process,
                    stopping_criteria, unfinished, pad_token_id, has_eos, streamer,
                )  # fmt: skip
            length += n
            accepted_per_pass.append(n)
            _learn_acceptance(stats, draft, ids, old_len, path, running_before)

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
            guesser.update_candidate_strategy(ids[:, :length], draft, logits, n, path)
            if on_clock and saved is None:  # (a snapshot pass re-feeds its tokens: its cost is not this shape's)
                cost.record_overhead(fed.shape[1], time.perf_counter() - pass_started - forward_seconds)
            if jacobi_trace is not None:
                jacobi_trace.append(_trace_record(old_len, draft, logits[:, -(q + 1) :], path, n))

            # the cost curve, measured once per model and thread count on the real cache (a few forwards), with the
            # linear layers' fastest route per size chosen on the way
            if passes == 1 and adaptive and not cost.calibrated and not needs_snapshot(cache):
                if unfinished.max() > 0:
                    timed = lambda k, at=length: timed_forward(  # noqa: E731
                        forward, cache, ids, positions, mask, at, k, trees, model.dtype
                    )
                    if row_plan is not None:  # measured now, or earlier (in this process or a saved one)
                        times = row_plan.seconds or row_plan.calibrate(timed, model.dtype == torch.float32)
                        for k, seconds in times.items():
                            cost.record(k, seconds)
                        cost.calibrated = True
                    else:
                        cost.calibrate(timed)

    stats.merge_into_model(model)
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
    check_inputs(input_ids, kwargs.get("block_size"), kwargs.get("guesser"))
    return model.generate(input_ids, custom_generate=jacobi_decoding, jacobi_streamer=streamer, **kwargs)


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


# --------------------------------------------------------------------------------------------------------------------
# Planning the guesses of a pass (cost-aware), and learning from what was accepted
# --------------------------------------------------------------------------------------------------------------------


def _plan_draft(proposals, stats, cost, uncached, max_nodes, chain_only, adaptive, ids) -> Draft:
    """The guesses of this pass: each row's candidates merged into a tree, the part worth its cost kept
    (`speculation.plan`), as a `Draft` (a chain when every row keeps one path)."""
    trees = []
    for candidates in proposals:
        # planning by cost: candidates stop where they are nearly sure to be rejected (a Jacobi block is 64 guesses)
        tree = Tree(min_reach=Tree.MIN_REACH if adaptive else 0.0)
        for tokens, source in candidates:
            tree.add(tokens, source, stats)
        trees.append(tree)
    if not any(tree.tokens for tree in trees):
        return Draft(ids[:, :0])
    if not adaptive:  # the textbook windows: everything the guesser proposed (lookahead: its best-trusted nodes)
        chosen = plan(trees, cost, uncached, max_nodes, chain_only, force=max_nodes)
    else:
        chosen = plan(trees, cost, uncached, max_nodes, chain_only)
    if not any(chosen):
        return Draft(ids[:, :0])
    paths = [tree.paths(nodes) for tree, nodes in zip(trees, chosen, strict=True)]
    draft = build_draft([[tokens for tokens, _ in row] for row in paths], filler=ids[:, -1].tolist(), device=ids.device)
    # every node's source as the tree labelled it (alternatives apart), for `_learn_acceptance`
    q = draft.tokens.shape[1]
    tokens = draft.tokens.tolist()
    parents = draft.parents or [list(range(-1, q - 1))] * len(trees)
    draft.sources = [
        tree.labels(row, parent_of, len(nodes))
        for tree, nodes, row, parent_of in zip(trees, chosen, tokens, parents, strict=True)
    ]
    return draft


def _learn_acceptance(stats, draft, ids, start, path, running) -> None:
    """Tell `stats` which guesses were accepted: every node whose parent was accepted (or is the root) was tried; it
    was accepted iff its token is the one committed at its position."""
    if draft.sources is None:
        return
    q = draft.tokens.shape[1]
    guesses = draft.tokens.tolist()
    depths = draft.depth.tolist() if draft.depth is not None else [list(range(1, q + 1))] * len(guesses)
    committed = ids[:, start : start + 1 + max((len(p) for p in path), default=0)].tolist()
    for b, sources in enumerate(draft.sources):
        if not running[b]:
            continue
        parents = draft.parents[b] if draft.parents is not None else list(range(-1, q - 1))
        kept = set(path[b])
        for node, source in enumerate(sources):
            parent = parents[node]
            if source is None or (parent >= 0 and parent not in kept):
                continue
            depth = depths[b][node]
            if depth <= len(committed[b]):
                stats.update(source, depth, guesses[b][node] == committed[b][depth - 1])
