"""The LoLCATs hybrid with attention sinks, separate q / k maps and LoLCATs' linear weight, on a converted tiny Llama:
the RecurrentCache (state + sink slots + window, constant bytes) decodes exactly what the full forward computes
(generate with the cache vs use_cache=False; token-by-token and piecewise prefill vs one forward of the whole sequence);
the options are validated, saved and reloaded, and checkpoints saved before these options existed load as before."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

import hf_fastattn
from hf_fastattn.conversion import convert
from hf_fastattn.integration import hybrid_attention

VOCAB, PAD = 96, 0
OPTIONS = dict(hybrid=True, window=4, sinks=2, shared_feature_map=False, linear_weight="1")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def hybrid_model(**options):
    torch.manual_seed(0)
    model = convert(tiny_model("llama", initializer_range=0.2), "hedgehog", **{**OPTIONS, **options})
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():  # per-head mixes away from 1/2, and key maps away from the query maps
        if getattr(module, "fastattn_window_factor", None) is not None:
            module.fastattn_window_factor.copy_(torch.randn(module.fastattn_window_factor.shape, generator=gen))
        key_map = getattr(module, "fastattn_feature_map_k", None)
        if key_map is not None:
            key_map.weight.add_(0.3 * torch.randn(key_map.weight.shape, generator=gen))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


def left_padded(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_generate_with_sinks_in_the_cache_equals_no_cache():
    model = hybrid_model()
    ids, mask = left_padded([11, 6])
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, attention_mask=mask)
    out = model.generate(ids, max_new_tokens=12, **kwargs)
    plain = model.generate(ids, max_new_tokens=12, use_cache=False, **kwargs)
    assert out.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(plain.logits, 1), atol=1e-4, rtol=1e-4)
    cache = out.past_key_values
    assert isinstance(cache, hf_fastattn.RecurrentCache)
    for layer in cache.layers:  # two sink slots per row, both filled by each row's first real tokens
        keys, _, filled = layer.sink_kv
        assert keys.shape[2] == 2 and filled.all()
    longer = model.generate(ids, max_new_tokens=30, **kwargs)
    assert longer.past_key_values.nbytes() == cache.nbytes()  # constant memory, sinks included


def test_token_by_token_and_piecewise_prefill_equal_the_full_forward(monkeypatch):
    """Every position's logits, decoding one token at a time from an empty cache (sinks entering the sink slots as they
    leave the window, and later keys folded into the state; once every sink slot is filled, the in-place step on a
    ring of slots), equal the full forward's to 1e-5; a prefill in pieces of 8 then one token equal it too."""
    model = hybrid_model()
    ids, mask = left_padded([21, 14])
    pos = positions(mask)
    full = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    cache = hf_fastattn.RecurrentCache(model)
    ring_steps = []

    def spy(*args, **kwargs):
        ring_steps.append(1)
        return real_step(*args, **kwargs)

    real_step = hybrid_attention.hybrid_ring_step_
    monkeypatch.setattr(hybrid_attention, "hybrid_ring_step_", spy)
    for t in range(ids.shape[1]):
        step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                     cache=cache).logits
        real = mask[:, t].bool()
        torch.testing.assert_close(step[real, 0], full[real, t], atol=1e-5, rtol=1e-5)
    # row 1 (7 pads) fills its 2 sinks when its 2nd real token leaves the 4-token window: at step 7 + 2 + 4 = 13;
    # the ring serves the steps after that, in each layer
    assert len(ring_steps) == (ids.shape[1] - 13) * model.config.num_hidden_layers
    monkeypatch.setattr(hybrid_attention, "hybrid_ring_step_", real_step)
    monkeypatch.setattr(hybrid_attention, "_HYBRID_PREFILL_PIECE", 8)
    pieces = hf_fastattn.RecurrentCache(model)
    n = ids.shape[1] - 1
    prefill = model(input_ids=ids[:, :n], attention_mask=mask[:, :n], position_ids=pos[:, :n], cache=pieces).logits
    torch.testing.assert_close(prefill[mask[:, :n].bool()], full[:, :n][mask[:, :n].bool()], atol=1e-5, rtol=1e-5)
    last = model(input_ids=ids[:, n:], attention_mask=mask, position_ids=pos[:, n:], cache=pieces).logits
    torch.testing.assert_close(last[:, 0], full[:, n], atol=1e-5, rtol=1e-5)
    for a, b in zip(pieces.layers, cache.layers):
        for x, y in zip(a.sink_kv, b.sink_kv):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)  # projections of other shapes: rounding


def test_each_option_changes_the_model():
    """Sinks, the linear weight and the key map each change the logits (so the tests above exercise them)."""
    model = hybrid_model()
    ids, mask = left_padded([20, 20])
    base = model(input_ids=ids, use_cache=False).logits
    for change in (dict(sinks=0), dict(linear_weight="1-gamma")):
        other = hybrid_model()
        hf_fastattn.configure(other, **change)
        assert not torch.allclose(other(input_ids=ids, use_cache=False).logits, base, atol=1e-4), change
    shared = hybrid_model()
    for module in shared.modules():
        if hasattr(module, "fastattn_feature_map_k"):
            del module.fastattn_feature_map_k
    assert not torch.allclose(shared(input_ids=ids, use_cache=False).logits, base, atol=1e-4)


def test_options_are_saved_and_reloaded(tmp_path):
    model = hybrid_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.fastattn["sinks"] == 2 and loaded.config.fastattn["linear_weight"] == "1"
    assert any(hasattr(m, "fastattn_feature_map_k") for m in loaded.modules())
    ids, _ = left_padded([9, 9])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoint_saved_before_the_options_loads_as_before(tmp_path):
    """A hybrid checkpoint whose config names none of sinks / linear_weight / shared_feature_map (saved by an older
    hf_fastattn) loads with no sinks, weight 1 - gamma and one map: what it computed when it was saved."""
    model = hybrid_model(sinks=0, linear_weight="1-gamma", shared_feature_map=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("sinks", "linear_weight", "shared_feature_map"):
        config["fastattn_conversion"].pop(key)
        config["fastattn"].pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.fastattn["sinks"] == 0 and loaded.config.fastattn["linear_weight"] == "1-gamma"
    assert not any(hasattr(m, "fastattn_feature_map_k") for m in loaded.modules())
    ids, _ = left_padded([12, 12])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a new conversion gets the new defaults instead
    assert hybrid_model(sinks=4).config.fastattn["sinks"] == 4


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="shared_feature_map=False .* needs hybrid=True"):
        convert(tiny_model("llama"), "t2r", shared_feature_map=False)
    with pytest.raises(ValueError, match="sinks must be an int >= 0, got -1"):
        convert(tiny_model("llama"), "hedgehog", hybrid=True, sinks=-1)
    with pytest.raises(ValueError, match=r"linear_weight must be one of \['1-gamma', '1'\], got 'lolcats'"):
        convert(tiny_model("llama"), "hedgehog", hybrid=True, linear_weight="lolcats")
    with pytest.raises(ValueError, match="fastattn option sinks must be an int >= 0"):
        hf_fastattn.configure(tiny_model("llama"), window=8, sinks=1.5)
    model = hybrid_model()
    cache = hf_fastattn.RecurrentCache(model)
    ids, _ = left_padded([5])
    model(input_ids=ids, cache=cache)
    hf_fastattn.configure(model, sinks=3)
    with pytest.raises(ValueError, match="made for another model|sink slots"):
        model(input_ids=ids[:, :1], cache=cache)
