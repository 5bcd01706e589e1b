"""K/V pooling fit to the model's inputs ("mqa" / "gqa" init="calibrated"): the second moments it measures equal
those recomputed from the hidden states, the fit is exact when nothing is pooled, it keeps the model closer than the
weight-only fit where the inputs are anisotropic (as a pretrained LM's are), and the runner feeds it training blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids as _ids
from conftest import tiny_model

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.distill import lm_dataset
from hf_fastattn.conversion.families import family_of
from hf_fastattn.conversion.kv_pooling import (
    SLOW_TURN,
    _rope_pairs,
    _rotary_frequencies,
    _slow_pairs_unrotated,
    calibration_length,
    fit_kv,
    input_second_moments,
)
from hf_fastattn.conversion.runner import calibration_blocks, convert_with_recipe


def _out(model, x):
    with torch.no_grad():
        return model(x)[0]


def _anisotropic(family: str):
    """A tiny model whose attention inputs have a few dims 8x larger than the rest (a pretrained LM's norms do
    this): the weight-only fit weighs every input direction the same, which such inputs do not."""
    return _emphasize_norm_dims(tiny_model(family, initializer_range=0.2))


def _emphasize_norm_dims(model):
    norms = [layer.input_layernorm for layer in model.model.layers] if hasattr(model, "model") else [
        block.ln_1 for block in model.transformer.h
    ]
    with torch.no_grad():
        for norm in norms:
            norm.weight[:6] *= 8.0
            norm.weight[6:] *= 0.5
    return model


def test_second_moments_equal_the_hidden_states_recomputed():
    model = tiny_model("llama", initializer_range=0.2)
    ids = _ids(batch=2, n=20)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: not counted
    moments = input_second_moments(model, family_of(model), [{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            x = layer.input_layernorm(hidden[i])[mask.bool()].double()
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        torch.testing.assert_close(moments[layer.self_attn], x.t() @ x / len(x))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibrated_fit_is_exact_without_pooling_and_closer_than_the_weight_fit(family):
    model = _anisotropic(family)
    calibration = [_ids(seed=1, batch=4, n=32)]
    held_out = _ids(seed=2, batch=2, n=32)  # scored on other tokens than those calibrated on
    ref = _out(model, held_out)
    exact = convert(model, "gqa", num_key_value_heads=4, init="calibrated", calibration_data=calibration)
    torch.testing.assert_close(_out(exact, held_out), ref, rtol=1e-4, atol=1e-4)
    errors = {}
    for init in ("mean", "svd", "calibrated"):
        data = calibration if init == "calibrated" else None
        pooled = convert(model, "mqa", init=init, calibration_data=data)
        errors[init] = (_out(pooled, held_out) - ref).pow(2).mean().item()
    assert errors["calibrated"] < errors["svd"] and errors["calibrated"] < errors["mean"], errors
    assert pooled.config.fastattn_conversion == {"method": "mqa", "init": "calibrated"}


def test_slow_rotary_pairs_are_fit_as_plain_dims_over_the_calibration_context():
    """Rotary pairs that barely turn over the calibration blocks' length are fit like unrotated dims (one shared
    real subspace, a full per-head query map there): on held-out sequences of that length the pooled model is closer
    to the original than with every pair fit by its own complex factor (the fit without a context)."""
    rope_parameters = {"rope_theta": 1e5, "rope_type": "default"}
    model = _emphasize_norm_dims(tiny_model("llama", initializer_range=0.2, rope_parameters=rope_parameters))
    calibration = [_ids(seed=1, batch=4, n=32)]
    held_out = _ids(seed=2, batch=2, n=32)
    ref = _out(model, held_out)
    frequencies = _rotary_frequencies(model)
    torch.testing.assert_close(frequencies, model.model.rotary_emb.inv_freq)
    rope = _rope_pairs(model, 16)
    fast, plain = _slow_pairs_unrotated(rope, frequencies, 32)
    slow = [pair for pair, f in zip(rope[0], frequencies.tolist(), strict=True) if f * 32 < SLOW_TURN]
    assert len(slow) == 5 and fast == rope[0][:3] and plain == sorted(i for pair in slow for i in pair)
    assert _slow_pairs_unrotated(rope, frequencies, None) == rope
    fitted = convert(model, "mqa", init="calibrated", calibration_data=calibration)  # context: the blocks' 32
    without = copy.deepcopy(model)
    family = family_of(without)
    fit_kv(without, family, 1, input_second_moments(without, family, calibration))
    error, error_without = ((_out(m, held_out) - ref).pow(2).mean().item() for m in (fitted, without))
    assert error < 0.95 * error_without, (error, error_without)
    assert calibration_length([{"input_ids": _ids(n=8)}, _ids(n=12)[0]]) == 12


def test_calibration_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration_data="):
        convert(model, "mqa", init="calibrated")
    with pytest.raises(ValueError, match="does not use calibration_data"):
        convert(model, "mqa", init="svd", calibration_data=[_ids()])
    with pytest.raises(ValueError, match="does not use calibration_data"):
        convert(model, "t2r", calibration_data=[_ids()])
    with pytest.raises(ValueError, match="no batches"):
        convert(model, "mqa", init="calibrated", calibration_data=[])
    with pytest.raises(ValueError, match="init must be one of"):
        convert(model, "mqa", init="activations")
    with pytest.raises(ValueError, match="needs training data"):
        calibration_blocks([])


def test_the_recipe_runner_calibrates_on_the_first_training_blocks(text, tokenizer):
    teacher = _anisotropic("llama")
    dataset = lm_dataset(text[:20000], tokenizer, 64)
    model, plan = convert_with_recipe(teacher, "mqa", dataset, 0, overrides={"seq_len": 64})
    assert plan.options["init"] == "calibrated"
    blocks = calibration_blocks(dataset)
    assert len(blocks) == min(len(dataset), 16384 // 64) and blocks[0] == dataset[0]
    same = convert(teacher, "mqa", init="calibrated", calibration_data=blocks)
    x = _ids()
    torch.testing.assert_close(_out(model, x), _out(same, x))
    assert not torch.allclose(_out(model, x), _out(convert(teacher, "mqa", init="svd"), x))
