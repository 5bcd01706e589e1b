"""A third party's attention variant, added through the public registry in this one file (the README's "Adding an
attention variant"): plain softmax attention with a temperature option, registered with
`hf_fastattn.register_attention_variant`, run in a tiny Llama with left padding and compared with transformers' sdpa.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import sdpa_mask

import hf_fastattn

TOY = "toy_softmax"


@dataclass
class ToyOptions:
    toy_temperature: float = field(default=1.0, metadata={"help": "the logits are divided by it (> 0)."})

    def __post_init__(self):
        if not isinstance(self.toy_temperature, (int, float)) or self.toy_temperature <= 0:
            raise ValueError(f"fastattn option toy_temperature must be > 0, got {self.toy_temperature!r}")


def toy_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """Softmax attention written out: `sdpa_mask` hands a 4D boolean mask (True = attend), or None when causality
    alone masks; K/V heads repeated for grouped queries."""
    options = hf_fastattn.variant_options(module.config, TOY)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scaling / options.toy_temperature
    nq, n = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        allowed = torch.ones(nq, n, dtype=torch.bool).tril(n - nq) if causal else torch.ones(nq, n, dtype=torch.bool)
    else:
        allowed = attention_mask.to(torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a padded query row attends to nothing
    return (weights @ value).transpose(1, 2).contiguous(), None


@pytest.fixture
def toy():
    """Register the toy variant for one test and remove it after (other tests see the built-ins only)."""
    variant = hf_fastattn.register_attention_variant(TOY, toy_attention_forward, sdpa_mask, ToyOptions, softmax=True)
    yield variant
    hf_fastattn.unregister_attention_variant(TOY)


def tiny_llama(attn_implementation="sdpa"):
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def left_padded():
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # the second row is 7 tokens, left-padded
    return ids, mask


def test_toy_variant_runs_in_a_padded_llama_as_sdpa(toy):
    ids, mask = left_padded()
    reference = tiny_llama("sdpa")
    model = tiny_llama("sdpa")
    model.set_attn_implementation(TOY)
    assert model.config._attn_implementation == TOY
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    # decoding with transformers' DynamicCache (not recurrent): queries are the last Nq of N keys
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    ref = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert not isinstance(out.past_key_values, hf_fastattn.RecurrentCache)


def test_toy_options_live_in_config_fastattn(toy, tmp_path):
    model = tiny_llama(TOY)
    ids, mask = left_padded()
    with torch.no_grad():
        default = model(input_ids=ids, attention_mask=mask).logits
    options = hf_fastattn.configure(model, toy_temperature=4.0, kv_groups=2)  # several variants' keys in one dict
    assert options.toy_temperature == 4.0 and options.kv_groups == 2
    assert model.config.fastattn == {"toy_temperature": 4.0, "kv_groups": 2}
    with torch.no_grad():
        hotter = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(default, hotter)
    with pytest.raises(ValueError, match="toy_temperature must be > 0"):
        hf_fastattn.configure(model, toy_temperature=0.0)
    unknown = r"unknown fastattn option\(s\) \['toy_temp'\]; valid options are \[.*'toy_temperature'"
    with pytest.raises(ValueError, match=unknown):
        hf_fastattn.configure(model, toy_temp=2.0)
    assert "toy_temperature" in hf_fastattn.integration.variants.merged_options_class().__doc__
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=TOY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, hotter)


def test_registry_lists_the_toy_and_refuses_duplicates(toy):
    assert TOY in hf_fastattn.IMPLEMENTATIONS and TOY in hf_fastattn.variant_names()
    assert TOY in hf_fastattn.integration.registry.ATTENTION_FUNCTIONS
    with pytest.raises(ValueError, match=f"attention variant '{TOY}' is already registered"):
        hf_fastattn.register_attention_variant(TOY, toy_attention_forward, sdpa_mask, ToyOptions)
    with pytest.raises(ValueError, match="'linear' is already registered"):
        hf_fastattn.register_attention_variant("linear", toy_attention_forward, sdpa_mask, ToyOptions)
    with pytest.raises(ValueError, match="would replace transformers' own implementation"):
        hf_fastattn.register_attention_variant("sdpa", toy_attention_forward, sdpa_mask, ToyOptions)

    @dataclass
    class Clashing:  # `backend` already means something else ("auto" by default)
        backend: str = field(default="fast", metadata={"help": "x"})

    clash = "option 'backend' defaults to 'fast', but a registered variant gives it 'auto'"
    with pytest.raises(ValueError, match=clash):
        hf_fastattn.register_attention_variant("toy2", toy_attention_forward, sdpa_mask, Clashing)
    assert "toy2" not in hf_fastattn.variant_names()
    # a mistyped name is answered with the registered variants, the toy included
    with pytest.raises(ValueError, match=f'hf_fastattn also registers .*"{TOY}"\\. Did you mean "{TOY}"'):
        tiny_llama().set_attn_implementation("toy_softmx")


def test_unregistered_toy_is_gone(toy):
    hf_fastattn.unregister_attention_variant(TOY)
    assert TOY not in hf_fastattn.IMPLEMENTATIONS
    with pytest.raises(ValueError, match="is not supported"):
        tiny_llama().set_attn_implementation(TOY)
    hf_fastattn.register_attention_variant(TOY, toy_attention_forward, sdpa_mask, ToyOptions, softmax=True)


def test_converted_checkpoint_guard_knows_the_toy(toy, tmp_path):
    """A converted checkpoint saves "hf_fastattn_<variant>" as its attn_implementation, so that loading it without
    the plugin fails instead of silently running softmax attention: the toy is a registered variant like the rest."""
    converted = hf_fastattn.convert(tiny_llama(), "t2r")
    converted.set_attn_implementation(TOY)
    assert converted.config.to_dict()["attn_implementation"] == f"hf_fastattn_{TOY}"
    converted.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == f"hf_fastattn_{TOY}"


def test_softmax_variant_is_refused_where_the_softmax_has_extra_terms(toy):
    """Registered with softmax=True, the toy falls under the compatibility rule of "sparse" / "mqa" (rule 5)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    reason = hf_fastattn.incompatibility(Gemma2ForCausalLM, config, TOY)
    assert reason is not None and "soft-capping" in reason
    assert hf_fastattn.incompatibility(Gemma2ForCausalLM, config, "linear") is None


def test_the_readme_variant_runs_as_written():
    """The README's "Adding an attention variant" snippet, executed as written: it registers "tempered", which equals
    sdpa in a left-padded Llama (prefill and generate), and its option changes the output."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Adding an attention variant", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    try:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "readme_variant"})
        ids, mask = left_padded()
        reference, model = tiny_llama("sdpa"), tiny_llama("tempered")
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits
            logits = model(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            assert torch.equal(out, reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
            hf_fastattn.configure(model, tempered_temperature=2.0)
            assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[real], logits[real])
    finally:
        if "tempered" in hf_fastattn.variant_names():
            hf_fastattn.unregister_attention_variant("tempered")
