"""`hf-fastattn generate` and `hf-fastattn ddgviz`.

    hf-fastattn generate MODEL --prompt TEXT [--mode lookahead] [--max-new-tokens 64] [--compare]
    hf-fastattn ddgviz MODEL --prompt TEXT [--out DIR] [--mode jacobi] [--max-new-tokens 32]

MODEL is a local folder or a Hub id (loaded with `AutoModelForCausalLM` / `AutoTokenizer`).
"""

from __future__ import annotations

import argparse
import sys
import time

from .jacobi import MODES, jacobi_generate


def _load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name).eval().requires_grad_(False)
    return model, tokenizer


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-fastattn generate", description="Greedy text by Jacobi decoding."
    )
    parser.add_argument("model", help="local folder or Hub id of a causal LM")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--mode", default="lookahead", choices=MODES)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument(
        "--compare", action="store_true", help="also run greedy generate; check and time both"
    )
    args = parser.parse_args(argv)
    from transformers import TextStreamer

    model, tokenizer = _load(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
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


def ddgviz_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastattn ddgviz", description="Draw the Jacobi decoding grid.")
    parser.add_argument("model", help="local folder or Hub id of a causal LM")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", default="ddgviz", help="output folder for ddgviz.png and ddgviz.html")
    parser.add_argument("--mode", default="jacobi", choices=MODES)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=None)
    args = parser.parse_args(argv)
    from .ddgviz import ddgviz

    model, tokenizer = _load(args.model)
    paths = ddgviz(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        block_size=args.block_size,
        out_dir=args.out,
    )
    print(f"wrote {paths['png']} and {paths['html']}")
    return 0
