"""The compatibility rule (hf_fastattn.integration.compatibility) refuses, when the implementation is set, each
family it cannot serve, with its reason; the model keeps the attention it had."""

import pytest
import torch
import transformers

from hf_fastattn.integration.compatibility import incompatibility

from .families import CAUSAL_FAMILIES, model_class, refused, tiny_config, tiny_model, verdict

# family -> (implementation, what the reason says): one per kind of refusal
REFUSALS = {
    "bloom": ("linear", "its attention does not dispatch through transformers' AttentionInterface"),
    "mpt": ("fast", "its attention does not dispatch through transformers' AttentionInterface"),
    "xlstm": ("linear", "never calls transformers' AttentionInterface"),
    "deepseek_v3": ("linear", "multi-head latent attention (kv_lora_rank)"),
    "minicpm3": ("fast", "multi-head latent attention"),
    "bart": ("linear", "an encoder-decoder model"),
    "mamba": ("linear", "recurrent / state-space layers"),
    "jamba": ("fast", "recurrent / state-space layers"),
    "qwen3_next": ("linear", "recurrent / state-space layers"),
    "lfm3": ("linear", "layer types ['conv']"),
    "dots3_note": ("linear", "layer types ['indexed_attention']"),
    "gemma3n": ("linear", "KV sharing"),
    "diffllama": ("linear", "calls the attention function more than once per forward"),
    "hrm_text": ("fast", "runs its layers in loops"),
    "doge": ("linear", "learned dynamic mask"),
    "gpt_oss": ("sparse", "attention sinks (s_aux)"),
    "gemma2": ("mqa", "attention logit soft-capping"),
}


@pytest.mark.parametrize("family", sorted(REFUSALS))
def test_refused_when_set_with_the_reason(family):
    impl, reason = REFUSALS[family]
    cls = model_class(family)
    config = tiny_config(family)
    with pytest.raises(ValueError, match=rf"attn_implementation='{impl}' cannot serve {cls.__name__} .*{_re(reason)}"):
        cls._from_config(config, attn_implementation=impl)
    if family in ("bloom", "mpt", "diffllama", "gpt_oss"):  # already built: set_attn_implementation refuses too
        model = tiny_model(family)
        before = model.config._attn_implementation
        with pytest.raises(ValueError, match=_re(reason)):
            model.set_attn_implementation(impl)
        assert model.config._attn_implementation == before


def _re(text):
    import re

    return re.escape(text)


def test_bloom_and_mpt_were_silently_kept_on_softmax_by_transformers():
    """What the rule prevents: transformers' own set_attn_implementation accepts the name on Bloom and keeps its
    eager softmax attention (outputs unchanged)."""
    from hf_fastattn.integration import patching

    model = tiny_model("bloom")
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        patching._original_set_attn_implementation(model, "linear")
        after = model(ids).logits
    assert torch.equal(before, after)


def test_accepted_and_refused_softmax_variants_differ_only_by_softmax_extras():
    """gpt_oss and gemma2 serve "linear" and "fast" (no softmax logits to cap or sink) but not "sparse" / "mqa"."""
    for family in ("gpt_oss", "gemma2"):
        assert verdict(family, "linear") is None and verdict(family, "fast") is None
        assert verdict(family, "sparse") is not None and verdict(family, "mqa") is not None


def test_soft_capping_off_is_accepted_for_sparse():
    config = tiny_config("gemma2")
    config.attn_logit_softcapping = None
    assert incompatibility(model_class("gemma2"), config, "sparse") is None


def test_hand_assigned_implementation_is_refused_at_forward():
    """config._attn_implementation assigned by hand skips the checks made when it is set: the attention function
    refuses at the first forward, with the same reason."""
    model = tiny_model("diffllama")
    model.config._attn_implementation = "linear"
    with pytest.raises(ValueError, match="more than once per forward"):
        model(torch.randint(3, 100, (1, 5)))


def test_every_refused_family_with_a_tiny_config_is_refused_at_build():
    """Each family the rule refuses (and whose tiny config builds) raises in from_config, before any weight."""
    families = [f for f, r in refused("linear").items() if not r.startswith("not built")]
    assert len(families) >= 40
    for family in families:
        with pytest.raises(ValueError, match="cannot serve"):
            model_class(family)._from_config(tiny_config(family), attn_implementation="linear")


def test_rule_covers_every_causal_family():
    assert set(CAUSAL_FAMILIES) == set(transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_readme_table_is_the_tests_own_parametrization():
    import pathlib

    from .families import markdown_table

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README table is stale: run python tests/test_families/families.py"
