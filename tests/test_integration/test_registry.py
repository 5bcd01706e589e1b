"""Options in config.fastattn: validation, effect, persistence; unsupported models and masks."""

import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, DiffLlamaConfig, DiffLlamaForCausalLM

import hf_fastattn
from hf_fastattn import FastAttnOptions
from hf_fastattn.integration.common import padding_mask
from hf_fastattn.integration.variants import get_variant


def test_configure_changes_outputs_and_round_trips(tmp_path):
    model = tiny_model("llama", attn_implementation="fast")
    ids = torch.randint(3, 96, (1, 16))
    default = model(ids).logits
    hf_fastattn.configure(model, order=1, temperature=2.0)
    changed = model(ids).logits
    assert not torch.allclose(default, changed)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["fastattn"] == {"order": 1, "temperature": 2.0}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fast").eval()
    torch.testing.assert_close(loaded(ids).logits, changed)


def test_options_on_config_before_loading(tmp_path):
    from transformers import AutoConfig

    tiny_model("llama").save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    hf_fastattn.configure(config, feature_map="relu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=config, attn_implementation="linear")
    assert hf_fastattn.integration.registry.get_options(model.config).feature_map == "relu"


@pytest.mark.parametrize(
    "options,match",
    [
        (
            dict(orderr=2),
            r"unknown fastattn option\(s\) \['orderr'\]; valid options are \['feature_map', 'chunk_size', 'backend', "
            r"'window', .*'order', 'temperature', 'pattern', 'stride', 'local', 'summary', 'kv_groups'\]",
        ),
        (dict(feature_map="tanh"), "feature_map='tanh' is not one of"),
        (dict(order=4), "order must be 1 or 2"),
        (dict(stride=-1), "stride must be a positive int"),
        (dict(kv_groups=0), "kv_groups must be a positive int"),
        (dict(backend="cuda"), "backend must be"),
    ],
    ids=["unknown", "feature_map", "order", "stride", "kv_groups", "backend"],
)
def test_bad_options_raise(options, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        hf_fastattn.configure(model, **options)


def test_bad_option_set_after_loading_raises_at_forward():
    model = tiny_model("llama", attn_implementation="linear")
    model.config.fastattn = {"feature_mapp": "elu"}
    with pytest.raises(ValueError, match="valid options are"):
        model(torch.randint(3, 96, (1, 4)))


def test_mqa_groups_must_divide_heads_checked_by_configure():
    model = tiny_model("llama", attn_implementation="mqa")  # 2 K/V heads
    with pytest.raises(ValueError, match=r"kv_groups=3 must divide the model's 2 key/value heads \(valid: \[1, 2\]\)"):
        hf_fastattn.configure(model, kv_groups=3)
    assert "kv_groups" not in (getattr(model.config, "fastattn", None) or {})  # nothing stored
    hf_fastattn.configure(model, kv_groups=2)
    assert model.config.fastattn["kv_groups"] == 2


def test_mqa_groups_checked_when_the_implementation_is_set(tmp_path):
    """A bad kv_groups already in the config (a saved config.json, or set by hand) is refused by from_pretrained
    before the model is built and by set_attn_implementation, not at the first forward."""
    model = tiny_model("llama")
    model.config.fastattn = {"kv_groups": 4}
    with pytest.raises(ValueError, match=r"kv_groups=4 must divide the model's 2 key/value heads"):
        model.set_attn_implementation("mqa")
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"kv_groups=4 must divide the model's 2 key/value heads"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="mqa")
    # other implementations do not use kv_groups and load
    AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="linear")


def test_bad_option_in_saved_config_raises_at_load(tmp_path):
    model = tiny_model("llama")
    model.config.fastattn = {"feature_mapp": "elu"}
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown fastattn option\(s\) \['feature_mapp'\]; valid options are"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="linear")


def _diffllama():
    # DiffLlama dispatches through AttentionInterface but calls the function twice per forward: refused by the rule
    config = DiffLlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    return config, DiffLlamaForCausalLM(config).eval()


@pytest.mark.parametrize("impl", hf_fastattn.IMPLEMENTATIONS)
def test_unsupported_architecture_raises_when_set(tmp_path, impl):
    config, model = _diffllama()
    match = r"cannot serve DiffLlamaForCausalLM \(model_type='diffllama'\): .*more than once per forward"
    with pytest.raises(ValueError, match=match):
        model.set_attn_implementation(impl)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=match):
        DiffLlamaForCausalLM._from_config(config, attn_implementation=impl)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)


def test_unsupported_architecture_still_refused_at_forward():
    """Assigning config._attn_implementation by hand skips the checks above: the attention function refuses."""
    _, model = _diffllama()
    model.config._attn_implementation = "linear"
    with pytest.raises(ValueError, match=r"cannot serve DiffLlamaAttention .*more than once per forward"):
        model(torch.randint(0, 64, (1, 5)))


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_models_without_attention_interface_are_refused(name):
    """Bloom and MPT (ALiBi in their own eager code) accept set_attn_implementation with only a logged warning and
    keep softmax attention: hf_fastattn refuses instead."""
    import transformers

    if name == "bloom":
        config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
        model = transformers.BloomForCausalLM(config)
    else:
        model = transformers.MptForCausalLM(
            transformers.MptConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
        )
    for impl in hf_fastattn.IMPLEMENTATIONS:
        with pytest.raises(ValueError, match="its attention does not dispatch through transformers' AttentionInterface"):
            model.set_attn_implementation(impl)
    assert model.config._attn_implementation != "linear"


@pytest.mark.parametrize(
    "name,suggestion",
    [("Linear", "linear"), ("fastt", "fast"), ("MQA", "mqa"), ("sparce", "sparse"), ("sdpaa", "sdpa")],
)
def test_mistyped_name_lists_ours_and_a_close_match(tmp_path, name, suggestion):
    tiny_model("llama").save_pretrained(tmp_path)
    ours = r'hf_fastattn also registers "linear", "fast", "sparse", "mqa"\.'
    with pytest.raises(ValueError, match=ours + f' Did you mean "{suggestion}"') as info:
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
    assert f'attn_implementation="{name}"` is not supported' in str(info.value)  # transformers' own message first
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=ours + f' Did you mean "{suggestion}"'):
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == "sdpa"


def test_unrelated_name_lists_ours_without_suggestion():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r'registers "linear", "fast", "sparse", "mqa"\.$'):
        model.set_attn_implementation("xyzzy")


@pytest.mark.parametrize("name", ["eager", "sdpa", "linear"])
def test_valid_names_still_set(name):
    model = tiny_model("llama")
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    assert torch.isfinite(model(torch.randint(3, 96, (1, 5))).logits).all()


# the variants that register the 2D padding mask (the O(N) ones and "sparse")
PADDING_MASK_VARIANTS = [n for n in hf_fastattn.variant_names() if get_variant(n).mask_fn is padding_mask]


@pytest.mark.parametrize("impl", PADDING_MASK_VARIANTS)
def test_custom_4d_mask_is_rejected(impl):
    model = tiny_model("llama", attn_implementation=impl)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="takes a 2D padding mask"):
        model(torch.randint(3, 96, (1, 6)), attention_mask=mask)


def test_defaults_are_valid_and_documented():
    options = FastAttnOptions()
    for field in options.__dataclass_fields__:
        assert field in FastAttnOptions.__doc__


def test_one_config_with_every_variants_keys_serves_each_variant(tmp_path):
    """Users switch implementations on one config: a saved config.fastattn with keys of several variants loads under
    each, and each variant reads its own part (the others' keys are validated, not used)."""
    model = tiny_model("llama")
    hf_fastattn.configure(model, feature_map="relu", order=1, temperature=2.0, stride=4, kv_groups=2)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 96, (1, 10))
    for impl in hf_fastattn.variant_names():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert loaded.config.fastattn == model.config.fastattn
        assert torch.isfinite(loaded(ids).logits).all()
    options = {name: hf_fastattn.variant_options(model.config, name) for name in ("linear", "fast", "sparse", "mqa")}
    assert options["linear"].feature_map == "relu" and not hasattr(options["linear"], "order")
    assert (options["fast"].order, options["fast"].temperature) == (1, 2.0)
    assert options["sparse"].stride == 4 and options["mqa"].kv_groups == 2
    merged = hf_fastattn.integration.registry.get_options(model.config)
    assert isinstance(merged, FastAttnOptions) and (merged.feature_map, merged.order, merged.kv_groups) == ("relu", 1, 2)
