"""`rollback.growable_layers`: K/V appended into preallocated buffers (no `torch.cat` of the whole cache per forward)
hold exactly what a plain `DynamicCache` holds, through crops and tree compaction; the layers are plain again after."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import left_padded, tiny_llama
from transformers.cache_utils import DynamicCache, DynamicLayer

from hf_fastattn.generation.rollback import growable_layers, keep_path, rollback
from hf_fastattn.integration.cache import cache_argument


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _forward(model, tokens, cache, **kwargs):
    return model(tokens, use_cache=True, **{cache_argument(model): cache}, **kwargs).logits


def _assert_same(cache, reference):
    assert cache.get_seq_length() == reference.get_seq_length()
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=0)


def test_growable_layers_hold_what_a_dynamic_cache_holds():
    model = tiny_llama()
    ids, mask = left_padded([[5, 17, 33, 8, 61, 12], [9, 4, 22]])
    reference, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    steps = [ids[:, i : i + 1] for i in range(3)]
    _forward(model, ids, reference, attention_mask=mask)
    with growable_layers(cache, spare=4):
        first = _forward(model, ids, cache, attention_mask=mask)
        torch.testing.assert_close(first, _forward(model, ids, DynamicCache(config=model.config), attention_mask=mask))
        buffer = cache.layers[0].keys.data_ptr()
        for step in steps:  # one token at a time: written into the buffer, which is reused (spare room)
            full = torch.cat([mask, mask.new_ones(2, cache.get_seq_length() + 1 - mask.shape[1])], -1)
            ours = _forward(model, step, cache, attention_mask=full)
            theirs = _forward(model, step, reference, attention_mask=full)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            _assert_same(cache, reference)
        assert cache.layers[0].keys.data_ptr() == buffer
        rollback(cache, 2)  # a crop, then more tokens over the cropped ones
        rollback(reference, 2)
        _assert_same(cache, reference)
        for _ in range(3):  # past the spare room: the buffers grow, the contents stay
            full = torch.cat([mask, mask.new_ones(2, cache.get_seq_length() + 4 - mask.shape[1])], -1)
            _forward(model, ids[:, :4], cache, attention_mask=full)
            _forward(model, ids[:, :4], reference, attention_mask=full)
            _assert_same(cache, reference)
        start = cache.get_seq_length()
        tree = torch.tensor([[10, 11, 12], [13, 14, 15]])
        full = torch.cat([mask, mask.new_ones(2, start + 3 - mask.shape[1])], -1)
        _forward(model, tree, cache, attention_mask=full)
        _forward(model, tree, reference, attention_mask=full)
        keep_path(cache, start, [[1, 2], [0, 2]])  # compaction copies within the buffers
        keep_path(reference, start, [[1, 2], [0, 2]])
        _assert_same(cache, reference)
    assert all("update" not in layer.__dict__ and layer.keys.is_contiguous() for layer in cache.layers)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    _forward(model, ids[:, :1], cache)  # plain DynamicLayer.update again
    _forward(model, ids[:, :1], reference)
    _assert_same(cache, reference)
