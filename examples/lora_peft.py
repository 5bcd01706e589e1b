"""Hedgehog conversion with LoLCATs' two stages: attention transfer (feature maps only), then LoRA with `peft`.

python examples/lora_peft.py --tiny --out /tmp/hedgehog
python examples/lora_peft.py --model PATH --train-file TEXT --out DIR
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer  # noqa: E402

import hf_fastattn  # noqa: E402,F401
from hf_fastattn.conversion import FAMILIES, convert  # noqa: E402
from hf_fastattn.conversion.distill import (  # noqa: E402
    AttentionTransferTrainer,
    UptrainConfig,
    lm_dataset,
    perplexity,
    set_trainable,
    split_text,
    training_arguments,
)
from hf_fastattn.showcase.tinylm import corpus, tiny_llama, tiny_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model")
    p.add_argument("--train-file")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
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
    steps = args.steps or (3 if args.tiny else 300)
    data = lm_dataset(train_text, tokenizer, 64)
    cfg = UptrainConfig(batch_size=8, output_dir=os.path.join(args.out, "trainer"), logging_steps=1)

    converted = convert(model, "hedgehog", hybrid=True, window=16)
    # stage 1: only the feature maps (and window factors) train; the loss is MSE to the softmax attention outputs
    print("stage 1 trains:", len(set_trainable(converted, "attention_transfer")), "tensors")
    AttentionTransferTrainer(
        model=converted, args=training_arguments(cfg, steps, 1e-2, "transfer"), train_dataset=data
    ).train()

    # stage 2: LoRA on q, k, v, o through peft, the converted maps frozen
    for param in converted.parameters():
        param.requires_grad_(False)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=FAMILIES["llama"].lora_targets)
    peft_model = get_peft_model(converted, lora)
    peft_model.print_trainable_parameters()
    Trainer(model=peft_model, args=training_arguments(cfg, steps, 1e-3, "lora"), train_dataset=data).train()
    merged = peft_model.merge_and_unload()
    print(
        f"perplexity: original {perplexity(model, tokenizer, val_text[:4000], 64):.2f}, "
        f"converted {perplexity(merged, tokenizer, val_text[:4000], 64):.2f}"
    )
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
