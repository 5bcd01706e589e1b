"""The demo's measurements: decoding against context (what `generate` keeps and the time per step), where a model
overtakes a baseline, Jacobi decoding against greedy, and a pretrained model with each attention swapped in."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .bench.jacobi import make_prompts, run_one, time_methods
from .bench.utils import cache_nbytes, crossover, with_attention

JACOBI_MODES = ("jacobi", "lookahead")
HYBRID_WINDOW = 64  # the LoLCATs window of the hedgehog / t2r hybrids (softmax over the last 64 tokens)


class StepClock(LogitsProcessor):
    """Records the time of every decoding step (generate calls its logits processors once per new token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def decode_profile(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy `generate` of `new_tokens` after `prompt` `[1, P]`: the median seconds per step (prefill excluded),
    the cache generate chose and its bytes at the end."""
    clock = StepClock()
    out = model.generate(
        prompt.to(model.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True,
        pad_token_id=model.config.eos_token_id,
    )
    cache = getattr(out, "cache", None) or out.past_key_values  # "cache" from transformers 5.24
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "s_per_token": statistics.median(steps),
        "cache": type(cache).__name__,
        "cache_bytes": cache_nbytes(cache),
    }


def measure_decoding(models: dict, val_ids: torch.Tensor, contexts, steps: int, repeats: int) -> list[dict]:
    """One record per (model, context length), model by model: greedy `generate` of `steps` tokens after the
    first `context` ids of `val_ids`. Every pair runs `repeats` times, interleaved so that a busy spell of a shared
    machine hits all alike, and the fastest run is kept."""
    # beyond a model's trained length too: these are timings (RoPE itself has no limit), not quality
    contexts = [c for c in contexts if c + steps <= len(val_ids)]
    for model in models.values():
        decode_profile(model, val_ids[None, :16], 4)  # warm-up
    best = {}
    runs = [(name, context) for _ in range(repeats) for context in contexts for name in models]
    for name, context in tqdm(runs, desc="decoding at growing contexts"):
        profile = decode_profile(models[name], val_ids[None, :context], steps)
        if (name, context) not in best or profile["s_per_token"] < best[name, context]["s_per_token"]:
            best[name, context] = profile
    return [{"model": name, "context": context, **best[name, context]} for name in models for context in contexts]


def crossovers(decoding: list[dict], baseline: str = "teacher") -> dict:
    """{model: {"time": crossover, "cache": crossover}} against `baseline`, for every decoded model but it."""
    names = dict.fromkeys(d["model"] for d in decoding)
    return {
        name: {
            "time": crossover(decoding, name, baseline, "s_per_token"),
            "cache": crossover(decoding, name, baseline, "cache_bytes"),
        }
        for name in names
        if name != baseline
    }


@torch.no_grad()
def measure_jacobi(model, val_ids: torch.Tensor, prompts: int, prompt_tokens: int, new_tokens: int,
                   repeats: int) -> dict:
    """Greedy vs the Jacobi modes on `prompts` held-out prompts of `prompt_tokens` (with `hf-fastattn bench jacobi`'s
    helpers): summed best times of `repeats` runs, forward passes and new tokens per method. Raises AssertionError if
    any output differs from greedy's."""
    prompts = [p.to(model.device) for p in make_prompts(val_ids, prompts, prompt_tokens)]
    methods = ["greedy", *JACOBI_MODES]
    for method in methods:  # warm-up
        run_one(model, prompts[0], method, 8, None)
    totals = {m: {"seconds": 0.0, "passes": 0, "tokens": 0} for m in methods}
    for prompt in tqdm(prompts, desc="Jacobi vs greedy"):
        best, outputs = time_methods(model, prompt, methods, new_tokens, None, repeats)
        for method, (out, passes) in outputs.items():  # outputs are identical to greedy's, or we did not get here
            totals[method]["seconds"] += best[method]
            totals[method]["passes"] += passes
            totals[method]["tokens"] += out.shape[1] - prompt.shape[1]
    compared = len(prompts) * len(JACOBI_MODES)
    return {"totals": totals, "identical": True, "outputs_compared": compared}


def architecture_models(model) -> dict:
    """{name: model}: `model` as it is ("sdpa": softmax attention and the K/V cache generate gives it) and copies with
    "linear" attention and with the hybrid (linear + a softmax window of the last 64 tokens), untrained: the cost of
    decoding on this architecture does not depend on the weights."""
    return {
        "sdpa": model,
        "linear": with_attention(model, "linear"),
        "hybrid": with_attention(model, "linear", window=HYBRID_WINDOW),
    }


@torch.no_grad()
def measure_swap(model, val_ids: torch.Tensor, seq_len: int, tokens: int) -> list[dict]:
    """Perplexity of `model` on the first `tokens` held-out ids in windows of `seq_len`, with each attention of
    `hf-fastattn bench quality` swapped in, untrained: [{"variant", "attention", "ppl", "x_sdpa"}]."""
    from ..conversion.distill import perplexity_of_ids
    from .bench.quality import variants

    ids = val_ids[:tokens]
    rows = []
    for name, (implementation, options) in tqdm(variants(model.config).items(), desc="attention swapped in"):
        swapped = with_attention(model, implementation, **options)
        rows.append({"variant": name, "attention": implementation, "ppl": perplexity_of_ids(swapped, ids, seq_len)})
        del swapped
    for row in rows:
        row["x_sdpa"] = row["ppl"] / rows[0]["ppl"]
    return rows
