"""The LoLCATs hybrid's options after uptraining, on the small teacher of `hf-fastattn bench conversion`: one map for
q and k (shared_feature_map=True) or two, and the linear part's weight 1 - gamma or 1 (LoLCATs), each converted with
the "hedgehog" recipe (attention transfer, then LoRA) on the same tokens and scored on the same held-out text.

    OMP_NUM_THREADS=1 python benchmarks/bench_hybrid_options.py [--seq-len 128] [--budget 0.1] [--sinks 4]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch

from hf_fastattn.conversion.distill import lm_dataset, perplexity
from hf_fastattn.conversion.recipes import convert_with_recipe
from hf_fastattn.showcase.bench.conversion import TEACHER_STEPS, _split
from hf_fastattn.showcase.tinylm import corpus, get_tiny_llama


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the teacher's training tokens")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--recipe", default="hedgehog")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_text, val_text = _split(corpus(None))
    teacher, tok = get_tiny_llama(steps=TEACHER_STEPS)
    teacher.eval()
    budget = int(args.budget * teacher.config.tinylm_train_tokens)
    base = perplexity(teacher, tok, val_text, args.seq_len)
    print(f"teacher: val ppl {base:.3f} ({args.seq_len}-token windows); {budget} uptraining tokens each", flush=True)
    data = lm_dataset(train_text, tok, args.seq_len)
    for shared, weight in itertools.product([True, False], ["1-gamma", "1"]):
        options = {"shared_feature_map": shared, "linear_weight": weight, "sinks": args.sinks}
        began = time.perf_counter()
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as scratch:
            model, _ = convert_with_recipe(
                teacher, None, data, budget, recipe=args.recipe,
                overrides={"seq_len": args.seq_len, "options": options}, output_dir=scratch,
            )
        ppl = perplexity(model, tok, val_text, args.seq_len)
        print(f"{args.recipe} shared_feature_map={shared!s:5} linear_weight={weight:7} sinks={args.sinks}: "
              f"val ppl {ppl:.3f} ({ppl / base:.4f}x) ({(time.perf_counter() - began) / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
