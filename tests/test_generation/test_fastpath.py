"""`fast_verification`: the same forward (up to float rounding), without MKL's weight packing or K/V copies."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import tiny_llama
from transformers.cache_utils import DynamicCache

from hf_fastattn.generation.fastpath import (
    ATTENTION_NAME,
    fast_verification,
    gqa_sdpa_attention,
    small_rows_linear,
)
from hf_fastattn.integration.cache import cache_argument


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 40])
def test_small_rows_linear_equals_linear(rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40).double()
    x = torch.randn(1, rows, 24, dtype=torch.float64)
    torch.testing.assert_close(small_rows_linear(layer, x, max_rows=8), layer(x))
    out = small_rows_linear(layer, x.transpose(0, 1), max_rows=8)  # a non-contiguous input
    torch.testing.assert_close(out, layer(x.transpose(0, 1)))
    assert out.is_contiguous()
    padded = small_rows_linear(layer, x, max_rows=8, pad_rows={rows: rows + 1, 3: 4})  # computed on more rows
    torch.testing.assert_close(padded, layer(x))
    assert padded.shape == (1, rows, 40) and padded.is_contiguous()


def test_gqa_attention_equals_repeated_kv_without_copying(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    query = torch.randn(2, 6, 4, 8, dtype=torch.float64)
    key, value = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, 7, dtype=torch.float64)
    mask[0, 0, :, :2] = torch.finfo(torch.float64).min  # row 0: two padding keys
    mask[:, 0, :, 3:] = torch.full((4, 4), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
    reference, _ = sdpa.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)

    def no_repeat(*args, **kwargs):
        raise AssertionError("repeat_kv called: the K/V cache was copied")

    monkeypatch.setattr(sdpa, "repeat_kv", no_repeat)
    ours, _ = gqa_sdpa_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(ours, reference)


def test_fast_verification_keeps_logits_and_restores_the_model():
    model = tiny_llama()
    prompt, block = torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9, 10]])
    blocked = torch.finfo(model.dtype).min
    mask = torch.zeros(1, 1, 3, 8, dtype=model.dtype)
    mask[0, 0, :, 5:] = torch.full((3, 3), blocked, dtype=model.dtype).triu(1)

    def logits(fast):
        cache = {cache_argument(model): DynamicCache(config=model.config)}
        model(prompt, use_cache=True, **cache)
        with fast_verification(model, enabled=fast):
            assert (model.config._attn_implementation == ATTENTION_NAME) == fast
            return model(block, attention_mask=mask, position_ids=torch.arange(5, 8)[None], **cache).logits

    torch.testing.assert_close(logits(True), logits(False))
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), fast_verification(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
