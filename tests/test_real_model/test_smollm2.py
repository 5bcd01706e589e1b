"""Every implementation on the real pretrained SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 K/V heads),
checked against transformers' own sdpa path and against full-forward recomputation."""

import pytest
import torch

import hf_fastattn
from hf_fastattn.integration.registry import IMPLEMENTATIONS


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_the_packaged_model_is_the_real_checkpoint(smollm2, text_ids):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert getattr(config, "quantization_config", None) is None  # a plain model: save_pretrained works
    # a trained LM: low perplexity on real English text (a random model of this vocabulary scores ~49152)
    loss = model(text_ids, labels=text_ids).loss
    assert torch.exp(loss) < 300, torch.exp(loss)  # 109 on this Shakespeare passage
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_implementation_runs(fresh_smollm2, text_ids, implementation):
    fresh_smollm2.set_attn_implementation(implementation)
    logits = fresh_smollm2(text_ids[:, :48]).logits
    assert logits.shape == (1, 48, 49152) and torch.isfinite(logits).all()
    assert fresh_smollm2.config._attn_implementation == implementation


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_covering_sparse_equals_sdpa(smollm2, fresh_smollm2, text_ids, pattern):
    """A pattern whose allowed set covers every earlier key (stride >= the length) is causal softmax attention."""
    ids = text_ids[:, :64]
    expected = smollm2[0](ids).logits
    hf_fastattn.configure(fresh_smollm2, pattern=pattern, stride=64)
    fresh_smollm2.set_attn_implementation("sparse")
    torch.testing.assert_close(fresh_smollm2(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_runtime_mqa_equals_the_pooled_checkpoint(smollm2, fresh_smollm2, text_ids):
    """Run-time "mqa" (3 K/V heads mean-pooled to 1 inside attention) equals the checkpoint converted by
    mean-pooling the K/V projections, run with sdpa."""
    ids = text_ids[:, :64]
    pooled = hf_fastattn.convert(smollm2[0], "mqa")
    assert pooled.config.num_key_value_heads == 1
    fresh_smollm2.set_attn_implementation("mqa")
    runtime = fresh_smollm2(ids).logits
    # equal in exact arithmetic; 30 layers of fp32 rounding (pooled weights vs pooled projected keys) differ by <1e-3
    torch.testing.assert_close(runtime, pooled(ids).logits, atol=2e-3, rtol=1e-4)
    assert (runtime - smollm2[0](ids).logits).abs().max() > 1.0  # it did pool: 3 heads to 1 moves the logits


@pytest.mark.parametrize("implementation", ["linear", "fast"])
def test_cached_decoding_equals_full_forward(fresh_smollm2, text_ids, implementation):
    """Greedy decoding on the recurrent cache gives, step by step, the logits of a full `use_cache=False`
    forward over the same tokens."""
    model = fresh_smollm2
    model.set_attn_implementation(implementation)
    prompt = text_ids[:, :40]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert isinstance(out.cache, hf_fastattn.RecurrentCache)
    full = model(out.sequences, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        reference = full[:, prompt.shape[1] - 1 + step]
        torch.testing.assert_close(logits, reference, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("implementation", ["linear", "fast"])
def test_recurrent_cache_bytes_are_constant(fresh_smollm2, text_ids, implementation):
    model = fresh_smollm2
    model.set_attn_implementation(implementation)
    sizes = set()
    for length in (8, 40, 96):
        out = model.generate(text_ids[:, :length], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        sizes.add(out.cache.nbytes())
    assert len(sizes) == 1 and sizes.pop() > 0


def test_the_gguf_file_loads_as_the_cached_checkpoint(smollm2, text_ids):
    """`load_causal_lm(path.gguf)` (what every command's MODEL takes): dequantized into a plain model whose
    logits equal those of the safetensors checkpoint the short name cached from the same file."""
    from hf_fastattn.loading import load_causal_lm
    from hf_fastattn.pretrained import KNOWN_MODELS, cache_folder

    gguf = cache_folder("smollm2-135m") / KNOWN_MODELS["smollm2-135m"].member.split("/")[-1]
    model, tokenizer = load_causal_lm(str(gguf))
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer("Hello world").input_ids == smollm2[1]("Hello world").input_ids
    torch.testing.assert_close(model(text_ids[:, :32]).logits, smollm2[0](text_ids[:, :32]).logits, atol=0, rtol=0)


def test_commands_take_the_short_name_and_the_gguf_file(smollm2, tmp_path, text_ids):
    """`hf-fastattn generate smollm2-135m` (Jacobi output checked identical to greedy by --compare) and
    `hf-fastattn convert <file.gguf> --method mqa`, whose saved checkpoint reloads to `convert`'s logits."""
    from transformers import AutoModelForCausalLM

    from hf_fastattn.conversion.cli import main as convert_main
    from hf_fastattn.generation.cli import generate_main
    from hf_fastattn.pretrained import KNOWN_MODELS, cache_folder
    from hf_fastattn.showcase.tinylm import load_corpus

    assert generate_main(["smollm2-135m", "--prompt", "List three colors:", "--max-new-tokens", "6", "--compare"]) == 0
    gguf = cache_folder("smollm2-135m") / KNOWN_MODELS["smollm2-135m"].member.split("/")[-1]
    train = tmp_path / "train.txt"
    train.write_text(load_corpus()[:6000])
    out = tmp_path / "mqa"
    # --init mean: the recipe's circuit-preserving fit (svd) takes minutes on this model; mean pooling is convert's
    args = [str(gguf), "--method", "mqa", "--init", "mean", "--max-steps", "0", "--train-file", str(train),
            "--seq-len", "64", "--max-val-chars", "600", "--out", str(out)]
    with torch.enable_grad():
        assert convert_main(args) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = hf_fastattn.convert(smollm2[0], "mqa")  # the same weights (see the test above)
    ids = text_ids[:, :24]
    torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, atol=1e-5, rtol=1e-5)
