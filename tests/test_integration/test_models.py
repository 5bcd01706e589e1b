"""The registered implementations inside real transformers models of every supported family."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import hf_fastattn
from hf_fastattn.integration.common import padding_mask
from hf_fastattn.ops.reference import naive_fast_attention, naive_linear_attention

CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
FAMILIES = [*CAUSAL, "bert"]
IMPLS = list(hf_fastattn.variant_names())  # every registered variant


def _naive(fn):
    """An attention function running a naive quadratic reference: the independent model-level reference."""

    def forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        causal = is_causal if is_causal is not None else module.is_causal
        out = fn(query, key, value, causal=causal, padding_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None

    return forward


AttentionInterface.register("naive_linear_test", _naive(naive_linear_attention))
AttentionInterface.register("naive_fast_test", _naive(naive_fast_attention))
AttentionMaskInterface.register("naive_linear_test", padding_mask)
AttentionMaskInterface.register("naive_fast_test", padding_mask)


def _ids(family, b=2, n=24):
    return torch.randint(3, 96, (b, n))


def _out(model, family, ids, **kw):
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return out.last_hidden_state if family == "bert" else out.logits


def test_registered_in_both_interfaces():
    for name in hf_fastattn.IMPLEMENTATIONS:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_from_pretrained_and_set_attn_implementation(tmp_path, family, impl):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    auto = (
        __import__("transformers").AutoModel
        if family == "bert"
        else __import__("transformers").AutoModelForCausalLM
    )
    loaded = auto.from_pretrained(tmp_path, attn_implementation=impl).eval()
    assert loaded.config._attn_implementation == impl
    ids = _ids(family)
    out = _out(loaded, family, ids)
    model.set_attn_implementation(impl)
    torch.testing.assert_close(_out(model, family, ids), out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl,naive", [("linear", "naive_linear_test"), ("fast", "naive_fast_test")])
def test_linear_and_fast_equal_naive_reference_in_model(family, impl, naive):
    model = tiny_model(family, attn_implementation=naive)
    ids = _ids(family)
    expected = _out(model, family, ids)
    model.set_attn_implementation(impl)
    torch.testing.assert_close(_out(model, family, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_covering_pattern_equals_sdpa(family):
    model = tiny_model(family)
    ids = _ids(family)
    expected = _out(model, family, ids)
    hf_fastattn.configure(model, pattern="strided", stride=1)
    model.set_attn_implementation("sparse")
    torch.testing.assert_close(_out(model, family, ids), expected, atol=1e-5, rtol=1e-4)


def test_sparse_non_covering_differs_from_sdpa():
    model = tiny_model("llama")
    ids = _ids("llama", n=64)
    expected = _out(model, "llama", ids)
    hf_fastattn.configure(model, stride=8, local=2)
    model.set_attn_implementation("sparse")
    assert not torch.allclose(_out(model, "llama", ids), expected, atol=1e-3)


def _pool_rows(weight, heads, groups):
    """Mean-pool the output rows of a projection [heads * d, ...] within `groups` groups of heads."""
    d = weight.shape[0] // heads
    return (
        weight.view(groups, heads // groups, d, *weight.shape[1:])
        .mean(1)
        .reshape(groups * d, *weight.shape[1:])
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_mqa_equals_hand_pooled_llama(groups):
    model = tiny_model("llama")  # 4 query heads, 2 K/V heads
    ids = _ids("llama")
    pooled = tiny_model("llama", num_key_value_heads=groups)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = _pool_rows(tensor, 2, groups)
    pooled.load_state_dict(state)
    hf_fastattn.configure(model, kv_groups=groups)
    model.set_attn_implementation("mqa")
    torch.testing.assert_close(_out(model, "llama", ids), _out(pooled, "llama", ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_mqa_equals_hand_pooled_qwen3(tmp_path, groups):
    """Qwen3 normalizes each key head (k_norm) before RoPE: run-time "mqa" pools the projected keys before the norm,
    so it is the model with mean-pooled K/V projections (a standard Qwen3 with `groups` K/V heads, built here by hand)
    and `convert(model, "mqa")`; pooling the normalized keys would differ by about 3 in the logits."""
    model = tiny_model("qwen3", num_key_value_heads=4)  # 4 query heads, 4 K/V heads, head_dim 16
    ids = _ids("qwen3")
    pooled = tiny_model("qwen3", num_key_value_heads=groups)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = _pool_rows(tensor, 4, groups)
    pooled.load_state_dict(state)
    expected = _out(pooled, "qwen3", ids)
    original = _out(model, "qwen3", ids)
    if groups == 1:
        converted = hf_fastattn.convert(model, "mqa")
    else:
        converted = hf_fastattn.convert(model, "gqa", num_key_value_heads=groups)
    torch.testing.assert_close(_out(converted, "qwen3", ids), expected, atol=1e-5, rtol=1e-4)
    hf_fastattn.configure(model, kv_groups=groups)
    model.set_attn_implementation("mqa")
    torch.testing.assert_close(_out(model, "qwen3", ids), expected, atol=1e-5, rtol=1e-4)
    # built with "mqa" (from_pretrained, from_config): hooked at construction
    model.save_pretrained(tmp_path)
    loaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="mqa")
    torch.testing.assert_close(_out(loaded.eval(), "qwen3", ids), expected, atol=1e-5, rtol=1e-4)
    # switching back to sdpa leaves the keys alone
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_out(model, "qwen3", ids), original)


def test_mqa_qwen3_decodes_with_cache_like_without():
    model = tiny_model("qwen3", attn_implementation="mqa")
    ids = _ids("qwen3", b=1, n=6)
    with_cache = model.generate(ids, max_new_tokens=8, do_sample=False)
    without = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_mqa_qwen3_set_by_hand_is_refused():
    """`config._attn_implementation = "mqa"` skips the k_norm hook: the function refuses rather than pooling the
    normalized keys (another model)."""
    model = tiny_model("qwen3")
    model.config._attn_implementation = "mqa"
    with pytest.raises(ValueError, match=r"normalizes each key head \(k_norm\), so its keys must be pooled before"):
        _out(model, "qwen3", _ids("qwen3"))
    hf_fastattn.integration.mqa_attention.enable_mqa_key_pooling(model)
    assert torch.isfinite(_out(model, "qwen3", _ids("qwen3"))).all()


def test_mqa_equals_hand_pooled_gpt2():
    """GPT-2 has no native GQA: the reference ties every head's K and V to the mean over heads (bias included)."""
    model = tiny_model("gpt2")
    ids = _ids("gpt2")
    tied = tiny_model("gpt2")
    state = model.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            t = tensor.clone()
            hidden = t.shape[-1] // 3
            for part in (1, 2):  # K and V columns of the fused projection
                cols = t[..., part * hidden : (part + 1) * hidden]
                mean = cols.reshape(*cols.shape[:-1], 4, hidden // 4).mean(-2, keepdim=True)
                t[..., part * hidden : (part + 1) * hidden] = mean.expand(
                    *cols.shape[:-1], 4, hidden // 4
                ).reshape(cols.shape)
            state[name] = t
    tied.load_state_dict(state)
    model.set_attn_implementation("mqa")
    torch.testing.assert_close(_out(model, "gpt2", ids), _out(tied, "gpt2", ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_rows_equal_single_rows(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    if impl == "sparse":
        hf_fastattn.configure(model, stride=4, local=3)
    ids = _ids(family, b=3, n=20)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = _out(model, family, ids, attention_mask=mask, position_ids=positions)
    for row in range(3):
        start = int((mask[row] == 0).sum())
        alone = _out(model, family, ids[row : row + 1, start:])
        torch.testing.assert_close(batched[row, start:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_right_padded_bert_rows_equal_single_rows(impl):
    model = tiny_model("bert", attn_implementation=impl)
    ids = _ids("bert", b=2, n=18)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    batched = _out(model, "bert", ids, attention_mask=mask)
    alone = _out(model, "bert", ids[1:, :11])
    torch.testing.assert_close(batched[1, :11], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("impl", IMPLS)
def test_causality_in_model(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    ids = _ids(family, b=1, n=30)
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % 90 + 3
    a, b = _out(model, family, ids), _out(model, family, changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_its_default_cache_equals_no_cache(impl):
    """The cache generate picks by itself (a RecurrentCache for the variants registered recurrent, linear/fast, a
    DynamicCache otherwise; the explicit DynamicCache on linear/fast is tested in test_recurrent.py)."""
    model = tiny_model("llama", attn_implementation=impl)
    ids = _ids("llama", b=1, n=6)
    with_cache = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    without = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(with_cache.sequences, without)
    recurrent = impl in hf_fastattn.integration.variants.recurrent_variant_names()
    assert isinstance(with_cache.past_key_values, hf_fastattn.RecurrentCache) == recurrent
