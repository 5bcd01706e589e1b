"""`hf-fastattn generate` and `hf-fastattn ddgviz`.

    hf-fastattn generate MODEL --prompt TEXT [--mode lookahead] [--max-new-tokens 64] [--compare]
    hf-fastattn ddgviz MODEL --prompt TEXT [--out DIR] [--mode jacobi] [--max-new-tokens 32]

MODEL is a local folder or a Hub id (loaded with `AutoModelForCausalLM` / `AutoTokenizer`). Bad arguments (an empty
prompt, a count below 1, a local path that does not exist, an --out that is a file) are reported in one line with
exit code 2 before the model is loaded.
"""

from __future__ import annotations

import sys
import time

from ..cli import ArgumentParser, fail, int_at_least
from ..loading import check_model_path, check_output_dir, load_causal_lm
from .jacobi import MODES, jacobi_generate

_MODE_HELP = (
    "how each pass guesses: jacobi (the whole remaining output), gs_jacobi (blocks), hybrid (a sliding window), "
    "lookahead (n-gram candidates verified as a token tree)"
)
_BLOCK_HELP = (
    "guesses per pass (default: the mode's own: 12 for lookahead, 16 for gs_jacobi and hybrid, every remaining "
    "token for jacobi)"
)


def _load(name: str):
    model, tokenizer = load_causal_lm(name)
    return model.eval().requires_grad_(False), tokenizer


def _prompt_ids(tokenizer, prompt: str):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"--prompt {prompt!r} gives no tokens with this tokenizer; give some text to continue")
    return ids


def _common_arguments(parser: ArgumentParser, mode: str, max_new_tokens: int) -> None:
    parser.add_argument("model", help="local folder or Hub id of a causal LM")
    parser.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    parser.add_argument("--mode", default=mode, choices=MODES, help=_MODE_HELP)
    parser.add_argument(
        "--max-new-tokens", type=int_at_least(1), default=max_new_tokens, help="at most this many new tokens"
    )
    parser.add_argument("--block-size", type=int_at_least(1), default=None, help=_BLOCK_HELP)


def _check_common(parser: ArgumentParser, args) -> None:
    """Argument checks that argparse's types cannot make; all before any model is loaded."""
    if not args.prompt:
        parser.error("argument --prompt: is empty; give the text to continue")
    try:
        check_model_path(args.model)
    except ValueError as e:
        parser.error(str(e))


def generate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hf-fastattn generate", description="Greedy text by Jacobi decoding.")
    _common_arguments(parser, mode="lookahead", max_new_tokens=64)
    parser.add_argument(
        "--compare", action="store_true", help="also run greedy generate; check and time both (exit 1 if they differ)"
    )
    return parser


def generate_main(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    _check_common(parser, args)
    try:
        return _generate(args)
    except ValueError as e:  # a model that cannot be loaded or decoded, a prompt without tokens
        return fail(parser.prog, e)


def _generate(args) -> int:
    from transformers import TextStreamer

    model, tokenizer = _load(args.model)
    ids = _prompt_ids(tokenizer, args.prompt)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    out = jacobi_generate(
        model,
        ids,
        streamer=TextStreamer(tokenizer),
        mode=args.mode,
        block_size=args.block_size,
        return_dict_in_generate=True,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    new = out.sequences.shape[1] - ids.shape[1]
    print(
        f"[{args.mode}] {new} tokens in {out.num_forward_passes} forward passes "
        f"({new / max(out.num_forward_passes, 1):.2f} tokens/pass), {seconds:.2f} s",
        file=sys.stderr,
    )
    if args.compare:
        start = time.perf_counter()
        greedy = model.generate(ids, **kwargs)
        greedy_seconds = time.perf_counter() - start
        same = greedy.tolist() == out.sequences.tolist()
        print(f"[greedy] {greedy_seconds:.2f} s; identical output: {same}", file=sys.stderr)
        if not same:
            return 1
    return 0


def ddgviz_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hf-fastattn ddgviz", description="Draw the Jacobi decoding grid.")
    _common_arguments(parser, mode="jacobi", max_new_tokens=32)
    parser.add_argument(
        "--out", default="ddgviz", help="output folder for ddgviz.png and ddgviz.html (created if missing)"
    )
    return parser


def ddgviz_main(argv: list[str] | None = None) -> int:
    parser = ddgviz_parser()
    args = parser.parse_args(argv)
    _check_common(parser, args)
    try:
        check_output_dir(args.out)
    except ValueError as e:
        parser.error(str(e))
    from .ddgviz import ddgviz

    try:
        model, tokenizer = _load(args.model)
        _prompt_ids(tokenizer, args.prompt)
        paths = ddgviz(
            model,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            mode=args.mode,
            block_size=args.block_size,
            out_dir=args.out,
        )
    except ValueError as e:
        return fail(parser.prog, e)
    print(f"wrote {paths['png']} and {paths['html']}")
    return 0
