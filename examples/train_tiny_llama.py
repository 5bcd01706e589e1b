"""Train a small softmax Llama on the packaged tinyshakespeare and print its validation perplexity.

python examples/train_tiny_llama.py --steps 500 --out tiny_llama
python examples/train_tiny_llama.py --steps 1000     # the teacher of `hf-fastattn bench conversion`
python examples/train_tiny_llama.py --tiny          # seconds: a smoke run
"""

import argparse

from hf_fastattn.showcase.tinylm import load_corpus, perplexity, split_corpus, train_tiny_llama


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default=None, help="folder for the model and tokenizer (save_pretrained)")
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps of a very small model on 50 kB of text"
    )
    args = parser.parse_args()
    text = load_corpus()
    kwargs = {}
    if args.tiny:
        text = text[:50_000]
        kwargs = dict(
            steps=5,
            seq_len=32,
            batch_size=4,
            vocab_size=280,
            progress=False,
            config_overrides=dict(hidden_size=32, num_layers=1, num_heads=2),
        )
    model, tokenizer = train_tiny_llama(args.out, text=text, **({"steps": args.steps} | kwargs))
    _, val = split_corpus(text)
    print(f"validation perplexity: {perplexity(model, tokenizer, val, seq_len=128):.2f}")


if __name__ == "__main__":
    main()
