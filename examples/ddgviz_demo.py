"""DDGviz: which guessed tokens were already final at each Jacobi iteration, as a PNG and an HTML page.

python examples/ddgviz_demo.py                 # the tiny Llama trained on tinyshakespeare (tinylm)
python examples/ddgviz_demo.py --tiny          # a random tiny Llama, offline
python examples/ddgviz_demo.py --out DIR --mode gs_jacobi --model PATH_OR_ID
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fastattn.generation import ddgviz


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt", default="KING RICHARD II:\nNo matter where; of comfort no man speak:\n")
    parser.add_argument("--mode", default="jacobi", choices=["jacobi", "gs_jacobi", "hybrid", "lookahead"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="outputs/ddgviz")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.tiny:
        from hf_fastattn.showcase.tinylm import corpus, tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer(corpus(20_000), vocab_size=256)
        model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32).eval()
    elif args.model:
        model, tokenizer = (
            AutoModelForCausalLM.from_pretrained(args.model),
            AutoTokenizer.from_pretrained(args.model),
        )
    else:
        from hf_fastattn.showcase.tinylm import get_tiny_llama

        model, tokenizer = get_tiny_llama()
    paths = ddgviz(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode, out_dir=args.out
    )
    print(f"wrote {paths['png']} and {paths['html']}")


if __name__ == "__main__":
    main()
