"""Options in config.fastattn: validation, effect, persistence; unsupported models and masks."""

import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import hf_fastattn
from hf_fastattn import FastAttnOptions


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
            r"unknown fastattn option\(s\) \['orderr'\]; valid options are \['feature_map', 'order'",
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


def test_bad_option_in_saved_config_raises_at_forward():
    model = tiny_model("llama", attn_implementation="linear")
    model.config.fastattn = {"feature_mapp": "elu"}
    with pytest.raises(ValueError, match="valid options are"):
        model(torch.randint(3, 96, (1, 4)))


def test_mqa_groups_must_divide_heads():
    model = tiny_model("llama", attn_implementation="mqa")
    hf_fastattn.configure(model, kv_groups=3)
    with pytest.raises(ValueError, match="kv_groups=3 must divide"):
        model(torch.randint(3, 96, (1, 4)))


@pytest.mark.parametrize("impl", hf_fastattn.IMPLEMENTATIONS)
def test_unsupported_architecture_raises(impl):
    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = GPTNeoXForCausalLM(config).eval()
    model.set_attn_implementation(impl)
    with pytest.raises(ValueError, match=r"supported model types are \['llama'"):
        model(torch.randint(0, 64, (1, 5)))


@pytest.mark.parametrize("impl", ["linear", "fast", "sparse"])
def test_custom_4d_mask_is_rejected(impl):
    model = tiny_model("llama", attn_implementation=impl)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="takes a 2D padding mask"):
        model(torch.randint(3, 96, (1, 6)), attention_mask=mask)


def test_defaults_are_valid_and_documented():
    options = FastAttnOptions()
    for field in options.__dataclass_fields__:
        assert field in FastAttnOptions.__doc__
