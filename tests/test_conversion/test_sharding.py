"""`conversion.sharding.gather`: an FSDP2-sharded model back to a plain one with whole weights (what `uptrain` returns
after a stage trained under FSDP). One process (a world of 1, gloo) shards with torch's `fully_shard` as accelerate
does (each decoder layer, then the model); the 2-process FSDP run is `test_distributed_uptrain`."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import random_ids, tiny_model

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.sharding import gather, is_sharded
from hf_fastattn.conversion.uptraining import add_lora


@pytest.fixture
def world_of_one(tmp_path):
    if dist.is_initialized():
        pytest.fail("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


@pytest.mark.parametrize("kind", ["converted", "lora", "mqa"])
def test_gather_gives_the_plain_model_back(world_of_one, kind):
    torch.manual_seed(0)
    teacher = tiny_model("llama", tie_word_embeddings=True)  # tied like SmolLM2's
    model = convert(teacher, "mqa" if kind == "mqa" else "hedgehog", **({} if kind == "mqa" else {"hybrid": True}))
    if kind == "lora":
        model = add_lora(model, rank=4)
        for name, p in model.named_parameters():  # LoRA's B starts at zero: make the adapters count
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.generation_config.max_new_tokens = 7  # a setting the config alone would not give back
    model.eval()
    ids = random_ids(0, 2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    plain_class = type(model)

    sharded = _shard(model)
    assert is_sharded(sharded) and type(sharded) is not plain_class
    whole = gather(sharded)

    assert type(whole) is plain_class and not is_sharded(whole)
    assert whole.state_dict().keys() == state.keys()
    for key, value in whole.state_dict().items():
        assert type(value) is torch.Tensor and not value.is_meta, key
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert not any(t.is_meta for t in whole.buffers())
    assert {n: p.requires_grad for n, p in whole.named_parameters()} == trains
    base = whole.get_base_model() if kind == "lora" else whole
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    assert base.generation_config.max_new_tokens == 7
    assert not whole.training
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    if kind == "lora":  # peft merges into the gathered weights (it cannot into shards)
        merged = whole.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_gather_leaves_a_plain_model_alone():
    model = tiny_model("llama")
    assert not is_sharded(model) and gather(model) is model
