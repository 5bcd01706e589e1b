"""Greedy generation by Jacobi / lookahead decoding, streamed token by token, checked against plain `generate`.

The streamed run is shown, not timed; the timings compare Jacobi and greedy `generate` alike (no streamer, same
threads, best of three alternating runs).

python examples/jacobi_generate.py                      # the tiny Llama trained on tinyshakespeare (tinylm)
python examples/jacobi_generate.py --model PATH_OR_ID   # any causal LM
python examples/jacobi_generate.py --tiny               # a random tiny Llama, offline, seconds
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from hf_fastattn.generation import jacobi_decoding


def load(args):
    if args.tiny:
        from hf_fastattn.showcase.tinylm import corpus, tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer(corpus(20_000), vocab_size=256)
        return tiny_llama(vocab_size=len(tokenizer), hidden_size=32).eval(), tokenizer
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model).eval(), AutoTokenizer.from_pretrained(
            args.model
        )
    from hf_fastattn.showcase.tinylm import get_tiny_llama

    return get_tiny_llama()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?\n")
    parser.add_argument("--mode", default="lookahead", choices=["jacobi", "gs_jacobi", "hybrid", "lookahead"])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load(args)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    # 1. shown: the Jacobi run streamed token by token (untimed: printing is not decoding)
    out = model.generate(
        ids,
        custom_generate=jacobi_decoding,  # the whole integration: transformers prepares the inputs, then calls it
        mode=args.mode,
        streamer=TextStreamer(tokenizer),
        return_dict_in_generate=True,
        **settings,
    )
    greedy = model.generate(ids, **settings)
    # 2. timed: both without a streamer, alternating, the best of three each (a shared machine only slows runs down)
    jacobi_seconds, greedy_seconds = float("inf"), float("inf")
    for _ in range(3):
        start = time.perf_counter()
        model.generate(ids, custom_generate=jacobi_decoding, mode=args.mode, **settings)
        jacobi_seconds = min(jacobi_seconds, time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(ids, **settings)
        greedy_seconds = min(greedy_seconds, time.perf_counter() - start)

    new = out.sequences.shape[1] - ids.shape[1]
    print(f"\n{args.mode}: {new} tokens, {out.num_forward_passes} forward passes, {jacobi_seconds:.2f} s (best of 3)")
    print(f"tokens accepted per pass: {out.accepted_per_pass}")
    print(f"greedy generate: {new} forward passes, {greedy_seconds:.2f} s (best of 3)")
    assert out.sequences.tolist() == greedy.tolist(), "Jacobi decoding must reproduce greedy decoding"
    print("identical to greedy generate: yes")


if __name__ == "__main__":
    main()
