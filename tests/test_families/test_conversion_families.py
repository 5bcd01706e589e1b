"""Conversion (`hf_fastattn.conversion.convert`) on every family the compatibility rule accepts (the tiny models of
`families.py`): the family is read from the model (attention modules, heads, causality, K/V layout).

- feature maps ("hedgehog"; "t2r" with the sliding-window hybrid on causal families): finite logits that differ from
  the original (the swap took place), cached decoding on a RecurrentCache equal to use_cache=False, and
  save_pretrained + from_pretrained giving the same logits;
- K/V pooling ("gqa"): with as many groups as K/V heads nothing is pooled, so the logits equal the original model's
  (mean init; and the "svd" fit, exact then, where it applies); with one group the pooled model equals the original
  run with the run-time "mqa" implementation (`configure(kv_groups=1)`), the relation `methods/mqa.py` states; the
  layouts pooling cannot read are refused with a ValueError naming the family and the supported layouts.

Float64 models, float32 states in the O(N) operators: tolerances as in test_causal_families.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hf_fastattn
from hf_fastattn.conversion import convert
from hf_fastattn.conversion.families import family_of
from hf_fastattn.integration.cache import RecurrentCache, cache_argument

from .families import accepted, tiny_model
from .test_causal_families import _forward, _ids

TOL = dict(atol=1e-5, rtol=1e-4)
N, PREFIX = 10, 6
CAUSAL = accepted("linear")
ENCODERS = accepted("linear", masked=True)
CASES = [pytest.param(f, False, id=f) for f in CAUSAL] + [pytest.param(f, True, id=f"{f}-masked") for f in ENCODERS]
# the attention K/V pooling refuses, with its reason (hf_fastattn.conversion.families): fused layouts it cannot read
# (CodeGen, JetMoe, Falcon's query_key_value), a key norm over all heads at once (OLMo 2 and kin), value heads used outside the attention
# function (NeoMME)
POOLING_REFUSED = {
    "codegen",
    "falcon",
    "jetmoe",
    "olmo2",
    "olmo3",
    "flex_olmo",
    "olmoe",
    "minimax_m2",
    "neomme",
}
# where the pooled model is not what the run-time "mqa" computes on the original: none. "mqa" pools the keys (and
# values) before the attention's per-head norms, whatever their name (`mqa_attention.head_norms` reads them from the
# forward's code: `k_norm`; HunYuan's `key_layernorm`, after RoPE; LFM2's and Persimmon's `k_layernorm`; Llama 4's
# `qk_norm`, shared with the queries; Gemma 4's `k_norm` and `v_norm`), so it equals the pooled checkpoint, which
# normalizes the pooled keys. A family whose norm cannot be hooked so would be listed here, with the reason.
MQA_DIFFERS = set()


def _model(family, masked):
    return tiny_model(family, masked=masked)


def _logits(model, ids, masked, **kwargs):
    return model(ids, **kwargs).logits if masked else _forward(model, ids, use_cache=False, **kwargs)


def _decodes_like_the_full_forward(model, ids, full):
    cache = RecurrentCache(model)
    arg = cache_argument(model)
    steps = [_forward(model, ids[:, :PREFIX], use_cache=True, **{arg: cache})]
    for i in range(PREFIX, ids.shape[1]):
        steps.append(_forward(model, ids[:, i : i + 1], offset=i, use_cache=True, **{arg: cache}))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_every_family_the_rule_accepts_is_converted():
    assert len(CAUSAL) >= 90 and len(ENCODERS) >= 19, (len(CAUSAL), len(ENCODERS))


@pytest.mark.parametrize("family,masked", CASES)
def test_hedgehog_converts_decodes_and_round_trips(tmp_path, family, masked):
    model = _model(family, masked)
    ids = _ids(1, N)
    converted = convert(model, "hedgehog")
    assert family_of(converted).causal is not masked
    with torch.no_grad():
        original = _logits(model, ids, masked)
        out = _logits(converted, ids, masked)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, original, atol=1e-6)  # linear attention, not the softmax
        if not masked:
            _decodes_like_the_full_forward(converted, ids, out)
        converted.save_pretrained(tmp_path)
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        # MoE experts run the eager loop, as tiny_model sets (torch's grouped matmul has no float64)
        loaded = auto.from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager").eval()
        assert type(loaded) is type(converted)
        saved, restored = converted.state_dict(), loaded.state_dict()
        assert any("fastattn_feature_map" in k for k in restored) and set(restored) == set(saved)
        assert all(torch.equal(restored[k], saved[k]) for k in saved)
        # the logits up to buffers recomputed at load (HunYuan's rotary frequencies differ by 1e-8 in float64)
        torch.testing.assert_close(_logits(loaded, ids, masked), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_t2r_hybrid_decodes_recurrently(family):
    """The sliding-window hybrid with T2R maps: a window of 3 < 10 tokens, so the linear part and the window both
    serve; cached decoding keeps the state and the last 3 keys."""
    model = _model(family, False)
    converted = convert(model, "t2r", feature_dim=8, hybrid=True, window=3)
    ids = _ids(1, N)
    with torch.no_grad():
        full = _forward(converted, ids, use_cache=False)
        assert torch.isfinite(full).all()
        _decodes_like_the_full_forward(converted, ids, full)


@pytest.mark.parametrize("family,masked", CASES)
def test_kv_pooling(family, masked):
    model = _model(family, masked)
    h, hkv, _ = family_of(model).heads
    if family in POOLING_REFUSED:
        with pytest.raises(ValueError, match=rf"does not support '{family}': .*Supported: separate K and V"):
            convert(model, "gqa", num_key_value_heads=hkv)
        return
    if not family_of(model).native_gqa and family not in accepted("mqa", masked):
        # tied heads run on "mqa", which the rule refuses for attention sinks and soft-capping
        with pytest.raises(ValueError, match=r"attn_implementation='mqa' cannot serve"):
            convert(model, "mqa")
        return
    ids = _ids(1, N)
    with torch.no_grad():
        original = _logits(model, ids, masked)
        # nothing pooled: the original model
        same = convert(model, "gqa", num_key_value_heads=hkv)
        torch.testing.assert_close(_logits(same, ids, masked), original, atol=1e-12, rtol=0)
        try:
            fitted = convert(model, "gqa", num_key_value_heads=hkv, init="svd")
        except ValueError as err:  # norms, gates, sinks, partial or interleaved RoPE: refused, saying why
            assert "init='svd' does not apply" in str(err) and "use init='mean'" in str(err)
        else:
            # exact up to round-off: Ernie 4.5 applies RoPE in float32 (1e-8 here); a wrong rotary pairing, or a
            # norm between projection and attention, gives 1e-5 (NanoChat's parameter-free norms) to 1e-2
            torch.testing.assert_close(_logits(fitted, ids, masked), original, atol=1e-7, rtol=1e-7)
        # one group
        pooled = convert(model, "mqa")
        out = _logits(pooled, ids, masked)
        assert torch.isfinite(out).all()
        if hkv > 1:
            assert not torch.allclose(out, original, atol=1e-6)
        if family in accepted("mqa", masked) and family not in MQA_DIFFERS:
            hf_fastattn.configure(model, kv_groups=1)
            model.set_attn_implementation("mqa")
            torch.testing.assert_close(out, _logits(model, ids, masked), **TOL)


# the families whose attention normalizes each key (or value) head under a name other than k_norm, or shares it
HEAD_NORM_FAMILIES = ["hunyuan_v1_dense", "lfm2", "persimmon", "llama4_text", "gemma4_unified_text", "qwen3"]


@pytest.mark.parametrize("family", HEAD_NORM_FAMILIES)
def test_mqa_pools_before_the_head_norms_in_every_layout(family):
    """Run-time "mqa" equals the pooled checkpoint where the key norm cannot tell heads from tokens by shape (as many
    tokens as K/V heads; one token), and decodes with the cache as without."""
    model = _model(family, False)
    hkv = family_of(model).heads[1]
    pooled = convert(model, "mqa")
    hf_fastattn.configure(model, kv_groups=1)
    model.set_attn_implementation("mqa")
    with torch.no_grad():
        for n in sorted({hkv, 1}):
            ids = _ids(1, n)
            torch.testing.assert_close(_logits(model, ids, False), _logits(pooled, ids, False), **TOL)
        ids = _ids(1, 5)
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(cached, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0))
        assert torch.equal(cached, pooled.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "opt", "gpt2"])
def test_pooled_checkpoints_round_trip(tmp_path, family):
    """Native GQA (Llama's separate and Phi-3's fused projections shrink) and tied heads run by "mqa" (GPT-NeoX's
    per-head fused, OPT's separate, GPT-2's Conv1D projections) save and reload to the same logits. One family per
    layout, to keep this file under two minutes on one thread; the feature-map round trip above covers every family."""
    pooled = convert(_model(family, False), "mqa")
    pooled.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = _ids(1, N)
    with torch.no_grad():
        torch.testing.assert_close(
            _forward(loaded, ids, use_cache=False), _forward(pooled, ids, use_cache=False), atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("family,masked", CASES)
def test_lora_targets_are_the_attention_projections(family, masked):
    """peft wraps, with the derived `lora_targets`, Linear / Conv1D layers inside the attention modules (and the
    BERT kind's output projection beside them) and nothing else: every attention module gets adapters, on its K
    projection (or fused q/k/v projection) at least."""
    from peft import LoraConfig, get_peft_model

    model = _model(family, masked)
    fam = family_of(model)
    attention = {name for name, m in model.named_modules() if type(m).__name__ in fam.attention_classes}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=fam.lora_targets))
    wrapped = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    owners = {next((a for a in attention if n.startswith(a + ".")), None) for n in wrapped}
    bert_outputs = {
        n for n in wrapped if n.endswith(".output.dense") and n.removesuffix("output.dense") + "self" in attention
    }
    assert owners - {None} == attention
    k_names = {"k_proj", "key", "k", "Wk", "wk", "k_lin", "kv_proj", "c_attn", "qkv_proj", "Wqkv", "query_key_value"}
    for a in attention:
        assert any(n.startswith(a + ".") and n.rsplit(".", 1)[1] in k_names for n in wrapped), (a, wrapped)
    assert all(n in bert_outputs or any(n.startswith(a + ".") for a in attention) for n in wrapped)


@pytest.mark.parametrize(
    "family,masked",
    [("llama", False), ("gpt2", False), ("gpt_neox", False), ("gemma4_unified_text", False), ("modernbert", True)],
)
@pytest.mark.parametrize("method", ["linear", "fast"])
def test_linear_and_fast_conversions_equal_the_run_time_swap_and_round_trip(tmp_path, family, masked, method):
    """ "linear" / "fast" conversion is the run-time implementation on the same weights, saved as a converted
    checkpoint (one family per attention layout; every family's run-time swap is tested in test_causal_families)."""
    model = _model(family, masked)
    converted = convert(model, method)
    ids = _ids(1, N)
    with torch.no_grad():
        out = _logits(converted, ids, masked)
        model.set_attn_implementation(method)
        torch.testing.assert_close(out, _logits(model, ids, masked), atol=0, rtol=0)
        converted.save_pretrained(tmp_path)
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        loaded = auto.from_pretrained(tmp_path, dtype=torch.float64).eval()
        assert loaded.config._attn_implementation == method
        torch.testing.assert_close(_logits(loaded, ids, masked), out, atol=1e-6, rtol=1e-5)
