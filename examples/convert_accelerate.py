"""Convert a causal LM with Hedgehog and uptrain it (attention transfer, then LoRA) under `accelerate launch`.

    accelerate launch --num_processes 2 --cpu examples/convert_accelerate.py --tiny --out /tmp/hh
    python examples/convert_accelerate.py --model PATH --train-file TEXT --out DIR   # one process, same result

The global batch (--batch-size) is split over the processes, so 1 and N processes train on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import hf_fastattn  # noqa: E402,F401
from hf_fastattn.conversion import convert  # noqa: E402
from hf_fastattn.conversion.distill import UptrainConfig, lm_dataset, perplexity, split_text, uptrain  # noqa: E402
from hf_fastattn.showcase.tinylm import corpus, tiny_llama, tiny_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random 2-layer Llama + tiny tokenizer, a few steps")
    p.add_argument("--model", help="model directory (ignored with --tiny)")
    p.add_argument("--train-file", help="text file (default: tinyshakespeare)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()

    torch.set_num_threads(1)
    text = open(args.train_file).read() if args.train_file else corpus(40_000 if args.tiny else None)
    train_text, val_text = split_text(text)
    if args.tiny:
        tokenizer = tiny_tokenizer(text[:20_000])
        model = tiny_llama(len(tokenizer), seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    steps = args.steps or (3 if args.tiny else 200)
    converted = convert(model, "hedgehog")
    cfg = UptrainConfig(
        transfer_steps=steps,
        finetune="lora",
        finetune_steps=steps,
        batch_size=args.batch_size,
        output_dir=os.path.join(args.out, "trainer"),
        logging_steps=1,
    )
    converted = uptrain(converted, lm_dataset(train_text, tokenizer, args.seq_len), cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        ppl = perplexity(converted, tokenizer, val_text[:4000], args.seq_len)
        converted.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        maps = {
            n: p.detach().double().sum().item() for n, p in converted.named_parameters() if "fastattn_" in n
        }
        result = {"perplexity": ppl, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "map_sums": maps}
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"validation perplexity {ppl:.4f}; saved to {args.out}")


if __name__ == "__main__":
    main()
