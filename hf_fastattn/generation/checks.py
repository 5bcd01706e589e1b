"""The checks of Jacobi decoding's arguments: bad input raises a ValueError naming what was wrong and what is valid,
before any forward (`jacobi.jacobi_decoding`, `jacobi.jacobi_generate`)."""

from __future__ import annotations

import operator

import torch

from .guessers import MODES

_GUESSER_API = ("start", "get_candidates", "update_candidate_strategy", "max_nodes", "learns_from")


def check_model(model) -> None:
    """Jacobi decoding reproduces greedy decoding of a decoder-only model; refuse anything else loudly."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("Jacobi decoding is not applicable to encoder-decoder models: it needs a decoder-only LM")
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        raise ValueError(
            f"Jacobi decoding is not applicable to {type(model).__name__}: it needs a causal LM that can generate"
        )


def check_inputs(input_ids, block_size, guesser=None) -> None:
    """Refuse what would otherwise fail deep inside the decoding loop with a shape error."""
    missing = [name for name in _GUESSER_API if guesser is not None and not hasattr(guesser, name)]
    if missing:
        raise ValueError(
            f"guesser={type(guesser).__name__!r} lacks {missing}: a guesser has the interface of "
            f"hf_fastattn.generation.guessers.Guesser ({', '.join(_GUESSER_API)}); subclass it"
        )
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
            raise ValueError(f"block_size={block_size!r} must be a positive integer (or None for the mode's default)")


def check_config(generation_config, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a Jacobi decoding mode; choose one of {MODES}")
    if generation_config.num_beams > 1:
        raise ValueError(
            f"Jacobi decoding does greedy decoding or sampling, not beam search: num_beams="
            f"{generation_config.num_beams} must be 1 (use do_sample=False for greedy, do_sample=True to sample)"
        )
    if generation_config.num_return_sequences > 1:
        raise ValueError(
            f"Jacobi decoding returns one sequence per prompt: num_return_sequences="
            f"{generation_config.num_return_sequences} must be 1 (repeat the prompt in the batch instead)"
        )
    if getattr(generation_config, "assistant_model", None) is not None:
        raise ValueError("Jacobi decoding does not combine with assisted generation")
