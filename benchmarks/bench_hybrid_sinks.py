"""Untrained perplexity of the LoLCATs hybrid ("linear" with `window`, elu+1 map, gamma 1/2) on a real model as a
function of the attention sinks, next to sdpa: the measurement behind the `sinks` default (hf_fastattn.ops.hybrid).

    OMP_NUM_THREADS=1 python benchmarks/bench_hybrid_sinks.py [--model smollm2-135m] [--length 2048] [--tokens 4096]
        [--window 64] [--sinks 0 1 4 8] [--linear-weight 1-gamma 1] [--gamma 0.5 0.999]

Held-out text: the last 10% of tinyshakespeare, non-overlapping windows of `--length` tokens, `--tokens` in all.
`--gamma` sets every head's window share (the untrained default is 1/2; a gamma near 1 with linear_weight "1-gamma" is
the window-and-sinks softmax alone, StreamingLLM's setting, the part of the hybrid that sinks change).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from hf_fastattn.conversion.distill import perplexity_of_ids
from hf_fastattn.loading import load_causal_lm
from hf_fastattn.showcase.bench.quality import held_out_ids
from hf_fastattn.showcase.bench.utils import with_attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 4, 8])
    parser.add_argument("--linear-weight", nargs="+", default=["1-gamma"], choices=["1-gamma", "1"])
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.5], help="window share(s) of every head")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the sdpa reference row")
    args = parser.parse_args(argv)
    base, tokenizer = load_causal_lm(args.model, flag="--model")
    ids = held_out_ids(tokenizer, None, args.tokens)
    rows = [] if args.no_sdpa else [("sdpa", "sdpa", {}, None)]
    for gamma in args.gamma:
        for weight in args.linear_weight:
            for sinks in args.sinks:
                rows.append((f"window {args.window} sinks {sinks} linear_weight {weight} gamma {gamma}", "linear",
                             {"window": args.window, "sinks": sinks, "linear_weight": weight}, gamma))
    print(f"{args.model}, {args.tokens} held-out tokens in windows of {args.length}, {torch.get_num_threads()} threads")
    for name, implementation, options, gamma in rows:
        model = with_attention(base, implementation, **options)
        if gamma is not None and gamma != 0.5:
            # gamma 1: a logit whose sigmoid is 1.0 in float32, so that 1 - gamma is exactly 0 (window and sinks only)
            logit = 100.0 if gamma >= 1 else math.log(gamma / (1 - gamma))
            for module in model.modules():
                if hasattr(module, "num_key_value_groups") or hasattr(module, "k_proj"):
                    heads = model.config.num_attention_heads
                    module.fastattn_window_factor = torch.full((heads,), logit)
        began = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity_of_ids(model, ids, args.length, batch_size=1)
        print(f"{name:>54}: ppl {ppl:10.3f}  ({time.perf_counter() - began:.0f} s)", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
