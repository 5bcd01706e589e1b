"""Convert a causal LM to T2R linear attention and fine-tune it with the plain HF `Trainer`.

python examples/convert_finetune_trainer.py --tiny --out /tmp/t2r
python examples/convert_finetune_trainer.py --model PATH --train-file TEXT --out DIR --steps 500
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import hf_fastattn  # noqa: E402,F401
from hf_fastattn.conversion import convert  # noqa: E402
from hf_fastattn.conversion.distill import lm_dataset, perplexity, split_text  # noqa: E402
from hf_fastattn.showcase.tinylm import corpus, tiny_llama, tiny_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="random 2-layer Llama + tiny tokenizer, a few steps")
    p.add_argument("--model")
    p.add_argument("--train-file")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()

    text = open(args.train_file).read() if args.train_file else corpus(40_000 if args.tiny else None)
    train_text, val_text = split_text(text)
    if args.tiny:
        tokenizer = tiny_tokenizer(text[:20_000])
        model = tiny_llama(len(tokenizer))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)

    # 1. swap softmax attention for T2R's learned relu feature map (new parameters only; the rest is untouched)
    converted = convert(model, "t2r", feature_dim=32)
    print(
        f"perplexity: original {perplexity(model, tokenizer, val_text[:4000], args.seq_len):.2f}, "
        f"converted before fine-tuning {perplexity(converted, tokenizer, val_text[:4000], args.seq_len):.2f}"
    )

    # 2. ordinary causal-LM fine-tuning of all weights with the Trainer
    train_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=args.steps or (5 if args.tiny else 500),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        report_to=[],
        save_strategy="no",
        logging_steps=1 if args.tiny else 50,
        use_cpu=True,
    )
    Trainer(
        model=converted, args=train_args, train_dataset=lm_dataset(train_text, tokenizer, args.seq_len)
    ).train()
    print(
        f"perplexity after fine-tuning: {perplexity(converted, tokenizer, val_text[:4000], args.seq_len):.2f}"
    )

    # 3. save; after `import hf_fastattn`, AutoModelForCausalLM restores it (feature maps included)
    converted.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    print(f"reloaded {type(reloaded).__name__} from {args.out}")


if __name__ == "__main__":
    main()
