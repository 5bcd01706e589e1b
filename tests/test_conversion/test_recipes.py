"""The uptraining additions used by `hf-fastattn bench conversion`: the circuit-preserving K/V fit (mqa / gqa
init="svd"), "layer" transfer, logit distillation, per-stage batch sizes and the bench's token accounting."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids as _ids
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_fastattn.conversion import convert
from hf_fastattn.conversion.distill import (
    UptrainConfig,
    layer_transfer_loss,
    lm_dataset,
    set_trainable,
    uptrain,
)


def _out(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_svd_fit_is_exact_without_pooling_and_closer_than_mean(family):
    model = tiny_model(family, initializer_range=0.2)
    if family == "qwen2":  # q/k/v biases must be carried through the fit
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    p.normal_(0, 0.5)
    x = _ids()
    ref = _out(model, x)
    exact = convert(model, "gqa", num_key_value_heads=4, init="svd")
    torch.testing.assert_close(_out(exact, x), ref, rtol=1e-4, atol=1e-4)
    for groups in (1, 2):
        svd = convert(model, "gqa", num_key_value_heads=groups, init="svd")
        mean = convert(model, "gqa", num_key_value_heads=groups)
        assert (_out(svd, x) - ref).pow(2).mean() < (_out(mean, x) - ref).pow(2).mean()
    mqa = convert(model, "mqa", init="svd")
    assert mqa.config.fastattn_conversion == {"method": "mqa", "init": "svd"}


def test_svd_fit_of_a_gqa_model_and_round_trip(tmp_path):
    model = tiny_model("llama", initializer_range=0.2, num_key_value_heads=2)
    x = _ids()
    exact = convert(model, "gqa", num_key_value_heads=2, init="svd")
    torch.testing.assert_close(_out(exact, x), _out(model, x), rtol=1e-4, atol=1e-4)
    mqa = convert(model, "mqa", init="svd")
    assert mqa.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    mqa.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # a standard Llama checkpoint
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(_out(loaded, x), _out(mqa, x))


def test_svd_fit_errors():
    with pytest.raises(ValueError, match="q_norm"):
        convert(tiny_model("qwen3"), "mqa", init="svd")
    with pytest.raises(ValueError, match="init must be one of"):
        convert(tiny_model("llama"), "gqa", num_key_value_heads=2, init="pca")


@pytest.mark.parametrize("family,method,options", [("llama", "mqa", {"init": "svd"}), ("bert", "t2r", {})])
def test_layer_transfer_lowers_loss_and_keeps_the_teacher(family, method, options):
    torch.manual_seed(0)
    teacher = tiny_model(family, initializer_range=0.2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = convert(teacher, method, **options)
    params = [model.get_parameter(n) for n in set_trainable(model, "attention")]
    opt = torch.optim.Adam(params, lr=1e-2)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[1, 20:] = 0  # padding is excluded from the loss
    batch = {"input_ids": _ids(n=32, batch=4), "attention_mask": mask}
    losses = []
    for _ in range(15):
        loss = layer_transfer_loss(model, teacher, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # the teacher got no gradient and kept its weights; the student's non-attention weights got none either
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    attention = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in attention)
    # the hooks are gone: a plain forward runs the student itself
    x = _ids()
    assert not torch.allclose(_out(model, x), _out(teacher, x))


def test_uptrain_layer_transfer_and_distillation(tmp_path, text, tokenizer):
    teacher = tiny_model("llama", initializer_range=0.2)
    data = lm_dataset(text[:20_000], tokenizer, 32, max_blocks=64)
    cfg = UptrainConfig(
        transfer_steps=4,
        transfer_mode="layer",
        transfer_batch_size=2,
        transfer_proj_lr=1e-3,
        finetune="full",
        finetune_steps=3,
        batch_size=4,
        distill_weight=1.0,
        output_dir=str(tmp_path),
        logging_steps=1,
    )
    model = uptrain(convert(teacher, "t2r", feature_dim=16), data, cfg, teacher=teacher)
    assert model.config._attn_implementation == "linear"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="teacher="):
        uptrain(convert(teacher, "mqa"), data, cfg)
    with pytest.raises(ValueError, match="transfer_mode"):
        UptrainConfig(transfer_mode="logits")
    with pytest.raises(ValueError, match="distill_weight"):
        UptrainConfig(distill_weight=2.0)


def test_bench_recipe_token_accounting(monkeypatch, tmp_path, text, tokenizer):
    """`convert_and_uptrain` spends exactly the budget of `steps * batch_size` blocks over both stages."""
    import hf_fastattn.conversion.uptraining as uptraining
    from hf_fastattn.conversion import recipes
    from hf_fastattn.conversion import runner as conversion
    from hf_fastattn.showcase.bench import conversion as bench

    # one registry: the benchmark (and the demo) use conversion's recipes, not copies
    assert bench.RECIPES is recipes.RECIPES and bench.convert_and_uptrain is conversion.convert_and_uptrain

    teacher = tiny_model("llama")
    data = lm_dataset(text[:20_000], tokenizer, 16, max_blocks=64)
    calls = []

    def spy(model, dataset, cfg, data_collator=None, teacher=None):
        calls.append(cfg)
        return model

    monkeypatch.setattr(uptraining, "uptrain", spy)
    for method, recipe in recipes.RECIPES.items():
        _, steps = conversion.convert_and_uptrain(teacher, method, data, 5, 4, str(tmp_path))
        if recipe.finetune == "none":
            assert steps == 0
            continue
        cfg = calls[-1]
        used = cfg.transfer_steps * cfg.transfer_batch_size + cfg.finetune_steps * cfg.batch_size
        assert used == 20 and steps == 5, (method, cfg)
        assert cfg.transfer_mode == recipe.transfer_mode and cfg.distill_weight == recipe.distill


def test_every_method_has_a_default_recipe_and_plans_split_token_budgets():
    """Each conversion method's default is the `RECIPES` entry named after it; a plan spends at most its tokens
    (exactly, when the blocks divide evenly), stage 1 getting the recipe's share."""
    import dataclasses

    from hf_fastattn.conversion.core import CONVERSION_METHODS, get_method
    from hf_fastattn.conversion.recipes import RECIPES, default_recipe, make_plan

    get_method("t2r")
    for method in CONVERSION_METHODS:
        assert RECIPES[default_recipe(method)].method == method
    for name, recipe in RECIPES.items():
        recipe = dataclasses.replace(recipe, seq_len=recipe.seq_len or 128)  # the default: the model's context
        plan = make_plan(recipe=name, max_tokens=40 * recipe.seq_len, context=128)
        stage1 = plan.transfer_steps * recipe.transfer_batch * recipe.seq_len
        assert plan.tokens <= 40 * recipe.seq_len, name
        if recipe.finetune == "none":
            assert plan.finetune_steps == 0 and stage1 == (plan.tokens if recipe.transfer else 0)
        else:
            assert plan.tokens == 40 * recipe.seq_len, name  # batch sizes 1 and 2 divide 40 blocks and their shares
            assert stage1 == int(40 * recipe.transfer) * recipe.seq_len, name
    # steps instead of tokens: stage 1 gets the recipe's share of the blocks (hedgehog-lora 0.6 at batch 1: 52 blocks
    # for 35 of stage 2; hedgehog 0.75 at batch 1: 105)
    for name, expected in (("hedgehog-lora", 52), ("hedgehog", 105)):
        plan, r = make_plan("hedgehog", name, steps=35), RECIPES[name]
        stage1_blocks = int(35 * r.batch * r.transfer / (1 - r.transfer))
        assert (plan.finetune_steps, plan.transfer_steps) == (35, stage1_blocks // r.transfer_batch) == (35, expected)
    assert plan.max_tokens is None


def test_make_plan_errors_and_encoders():
    from hf_fastattn.conversion.recipes import make_plan

    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; valid recipes are \["):
        make_plan(recipe="nope", max_tokens=100)
    with pytest.raises(ValueError, match="no default recipe for conversion method 'performer'"):
        make_plan("performer", max_tokens=100)
    with pytest.raises(ValueError, match=r"unknown recipe setting\(s\) \['learning_rate'\]"):
        make_plan("mqa", max_tokens=100, overrides={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="not both"):
        make_plan("mqa", max_tokens=100, steps=3)
    with pytest.raises(ValueError, match=r"transfer must be a share in \[0, 1\]"):
        make_plan("mqa", max_tokens=100, overrides={"transfer": 1.5})
    with pytest.raises(ValueError, match="method 'mqa' has none: use transfer_mode 'layer'"):
        make_plan("mqa", max_tokens=1000, overrides={"transfer_mode": "attention"})
    assert make_plan(
        "mqa", max_tokens=1000, overrides={"transfer_mode": "attention", "transfer": 0}, context=128
    ).finetune_steps
    with pytest.raises(ValueError, match="recipe 't2r-hybrid' converts with method 't2r', not 'hedgehog'"):
        make_plan("hedgehog", "t2r-hybrid", max_tokens=100)
    # an encoder: no stage 2, no hybrid; the whole budget goes to stage 1, and the plan says why
    plan = make_plan("hedgehog", max_tokens=10 * 128, causal=False, context=128)
    assert plan.recipe.finetune == "none" and plan.options["hybrid"] is False
    assert plan.source("finetune").startswith("encoder") and plan.transfer_steps == 10 // plan.recipe.transfer_batch
    with pytest.raises(ValueError, match=r"finetune 'lora' \(--finetune\): stage 2 fine-tunes a causal LM"):
        make_plan("hedgehog", max_tokens=1280, overrides={"finetune": "lora"}, sources={"finetune": "--finetune"},
                  causal=False)


def test_convert_with_recipe_keeps_the_teacher(tmp_path, text, tokenizer):
    """The Python entry point: the default recipe, overrides, the teacher untouched (mqa: layer transfer, then
    distillation, on 16 blocks of 32 tokens)."""
    from hf_fastattn.conversion.recipes import RECIPES
    from hf_fastattn.conversion.runner import convert_with_recipe
    from hf_fastattn.conversion.uptraining import native_bf16

    teacher = tiny_model("llama")
    assert teacher.config.hidden_size * teacher.config.num_hidden_layers == 128  # the plan reads the model's size
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = lm_dataset(text[:20_000], tokenizer, 32, max_blocks=64)
    model, plan = convert_with_recipe(
        teacher, "mqa", data, 16 * 32, overrides={"seq_len": 32}, output_dir=str(tmp_path)
    )
    assert plan.name == "mqa" and plan.recipe.lr == RECIPES["mqa"].lr
    assert plan.sources == {
        "seq_len": "override",
        "gradient_checkpointing": "stage-2 steps of 1 x 32 tokens x 128 (hidden size x layers) = 4,096 (< 40,000,000)",
        "bf16": native_bf16()[1],
    }
    # a quarter of the 16 blocks for stage 1 (2 steps of 2), the other 12 for stage 2 at the recipe's batch
    assert (plan.transfer_steps, plan.finetune_steps, plan.tokens) == (2, 12 // RECIPES["mqa"].batch, 16 * 32)
    assert model.config.fastattn_conversion == {"method": "mqa", "init": "calibrated"} and not model.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # without the override the blocks are the model's context (its 256 positions)
    with pytest.raises(ValueError, match="the dataset's blocks have 32 tokens; the plan's seq_len is 256"):
        convert_with_recipe(teacher, "mqa", data, 16 * 32, output_dir=str(tmp_path))


def test_convert_takes_a_recipes_options():
    """`convert(..., recipe=)`: the recipe's conversion options ("default": the method's), explicit ones on top;
    an encoder's default hedgehog drops the causal-only hybrid."""
    from hf_fastattn.conversion.recipes import RECIPES

    model = tiny_model("llama")
    spec = convert(model, "hedgehog", recipe="default").config.fastattn_conversion
    assert {k: spec[k] for k in RECIPES["hedgehog"].options} == RECIPES["hedgehog"].options
    spec = convert(model, "t2r", recipe="t2r-hybrid", window=8).config.fastattn_conversion
    assert (spec["feature_dim"], spec["hybrid"], spec["window"]) == (64, True, 8)
    assert convert(model, "t2r").config.fastattn_conversion["feature_dim"] == 64  # no recipe: the method's defaults
    assert convert(tiny_model("bert"), "hedgehog", recipe="default").config.fastattn_conversion["hybrid"] is False
    with pytest.raises(ValueError, match="recipe 'mqa' converts with method 'mqa', not 't2r'"):
        convert(model, "t2r", recipe="mqa")


def test_run_plan_starts_new_maps_from_its_seed():
    """t2r's feature maps are initialized randomly: `run_plan` seeds them, so the CLI and the benchmark (which
    converts other models first) start from the same maps; the caller's random stream is left as it was."""
    from hf_fastattn.conversion.recipes import make_plan
    from hf_fastattn.conversion.runner import run_plan

    teacher = tiny_model("llama")
    plan = make_plan("t2r", max_tokens=0, overrides={"options": {"feature_dim": 16}})
    torch.manual_seed(1)
    a = run_plan(teacher, plan, None)
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = run_plan(teacher, plan, None)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(run_plan(teacher, plan, None, seed=1).model.layers[0].self_attn.fastattn_feature_map.weight,
                           a.model.layers[0].self_attn.fastattn_feature_map.weight)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)


def test_default_block_length_is_the_models_context():
    """A recipe without its own `seq_len` trains at the model's context as the config states it (Llama's
    max_position_embeddings, GPT-2's n_positions, a multimodal config's text_config), at most MAX_SEQ_LEN."""
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    from hf_fastattn.conversion.recipes import MAX_SEQ_LEN, context_length, recipe_seq_len

    assert context_length(LlamaConfig(max_position_embeddings=128)) == 128
    assert context_length(GPT2Config(n_positions=300)) == 300
    assert context_length(PretrainedConfig()) is None
    wrapper = PretrainedConfig()
    wrapper.text_config = LlamaConfig(max_position_embeddings=4096)
    assert context_length(wrapper) == 4096
    assert recipe_seq_len("hedgehog", LlamaConfig(max_position_embeddings=128)) == 128
    assert recipe_seq_len("hedgehog", LlamaConfig(max_position_embeddings=8192)) == MAX_SEQ_LEN == 2048
    assert recipe_seq_len("hedgehog", PretrainedConfig()) == MAX_SEQ_LEN


def test_a_recipes_block_length_is_capped_at_the_models_context(monkeypatch):
    """A recipe's own `seq_len` is used as it is up to the model's context and capped there (the plan says so); an
    explicit override is the user's and taken as given."""
    from transformers import LlamaConfig, PretrainedConfig

    from hf_fastattn.conversion.recipes import RECIPES, Recipe, make_plan, recipe_seq_len

    monkeypatch.setitem(RECIPES, "short-blocks", Recipe("mqa", {"init": "mean"}, seq_len=512))
    assert recipe_seq_len("short-blocks", LlamaConfig(max_position_embeddings=8192)) == 512
    assert recipe_seq_len("short-blocks", LlamaConfig(max_position_embeddings=128)) == 128
    assert recipe_seq_len("short-blocks", PretrainedConfig()) == 512
    long = make_plan("mqa", "short-blocks", max_tokens=4096, context=8192)
    assert long.recipe.seq_len == 512 and "seq_len" not in long.sources
    short = make_plan("mqa", "short-blocks", max_tokens=4096, context=128)
    assert short.recipe.seq_len == 128
    assert short.source("seq_len") == "the recipe's 512, at most the model's context (128 positions)"
    given = make_plan("mqa", "short-blocks", max_tokens=4096, context=128, overrides={"seq_len": 256})
    assert given.recipe.seq_len == 256 and given.source("seq_len") == "override"


def test_default_checkpointing_by_stage():
    """The automatic activation checkpointing: none for short blocks; from `CHECKPOINT_FROM` tokens per block for
    both stages, except stage 1 without the attention-score loss, checkpointed only from `TRANSFER_CHECKPOINT_FROM`
    tokens per step (it holds only the attention modules; stage 2 only, "finetune", below that); explicit settings
    win."""
    from hf_fastattn.conversion.recipes import TRANSFER_CHECKPOINT_FROM, make_plan

    def plan(name, context, **overrides):
        return make_plan(name, max_tokens=64 * context, context=context, overrides=overrides)

    assert plan("hedgehog", 256).recipe.gradient_checkpointing is False
    long = plan("hedgehog", 2048)  # the recipe's attention transfer at batch 1: 2048 tokens per step
    assert long.recipe.gradient_checkpointing == "finetune"
    assert long.source("gradient_checkpointing") == (
        f"blocks of 2048 tokens (>= 1024); stage 2 only: stage-1 steps of 2048 tokens "
        f"(< {TRANSFER_CHECKPOINT_FROM})"
    )
    assert long.uptrain_config().gradient_checkpointing == "finetune"
    assert plan("hedgehog", 2048, transfer_batch=4).recipe.gradient_checkpointing is True
    assert plan("hedgehog", 2048, transfer=0.0).recipe.gradient_checkpointing is True
    assert plan("mqa", 2048).recipe.gradient_checkpointing == "finetune"  # layer transfer, 2 x 2048 tokens a step
    assert plan("t2r", 2048).recipe.gradient_checkpointing is True  # the attention-score loss: N x N weights
    assert plan("hedgehog", 2048, gradient_checkpointing=True).recipe.gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient_checkpointing must be True, False, 'finetune'"):
        plan("hedgehog", 2048, gradient_checkpointing="stage1")


def test_default_checkpointing_by_model_size():
    """Knowing the model, stage 2 is checkpointed by its stored activations: tokens per step x hidden size x layers
    from `CHECKPOINT_ACTIVATIONS`. SmolLM2-135M at one 2048-token block is under it (no checkpointing), at two
    blocks or a 1B model at one block over it; stage 1's own rule (steps of `TRANSFER_CHECKPOINT_FROM` tokens, the
    attention-score loss) still holds, and without a known size the block-length rule of the test above."""
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig

    from hf_fastattn.conversion.recipes import CHECKPOINT_ACTIVATIONS, activation_width, make_plan

    smol = activation_width(LlamaConfig(hidden_size=576, num_hidden_layers=30))
    big = activation_width(LlamaConfig(hidden_size=2048, num_hidden_layers=16))
    assert (smol, big) == (576 * 30, 2048 * 16)
    assert activation_width(GPT2Config(n_embd=64, n_layer=3)) == 192
    assert activation_width(PretrainedConfig()) is None
    assert 2048 * smol < CHECKPOINT_ACTIVATIONS <= 2 * 2048 * smol and 2048 * big >= CHECKPOINT_ACTIVATIONS

    def plan(name, width, **overrides):
        return make_plan(name, max_tokens=64 * 2048, context=8192, width=width, overrides=overrides)

    mqa = plan("mqa", smol)  # the recipe's stage 2 at batch 1
    assert mqa.recipe.gradient_checkpointing is False and mqa.uptrain_config().gradient_checkpointing is False
    assert mqa.source("gradient_checkpointing") == (
        "stage-2 steps of 1 x 2048 tokens x 17280 (hidden size x layers) = 35,389,440 (< 40,000,000)"
    )
    assert plan("mqa", smol, batch=2).recipe.gradient_checkpointing == "finetune"
    assert plan("gqa", smol).recipe.gradient_checkpointing == "finetune"  # batch 2
    assert plan("mqa", big).recipe.gradient_checkpointing == "finetune"
    assert plan("mqa", smol, seq_len=512).recipe.gradient_checkpointing is False
    assert plan("hedgehog", smol).recipe.gradient_checkpointing is False
    stage1 = plan("hedgehog", smol, transfer_batch=4)  # 8192-token attention-transfer steps
    assert stage1.recipe.gradient_checkpointing is True
    assert stage1.source("gradient_checkpointing").endswith("; on for stage 1: steps of 8192 tokens (>= 8192)")
    scored = plan("t2r", smol)  # the attention-score loss at 2048 tokens: N x N weights per layer and head
    assert scored.recipe.gradient_checkpointing is True
    assert scored.source("gradient_checkpointing").endswith("; on for stage 1: the attention-score loss")
    assert plan("mqa", smol, gradient_checkpointing=True).recipe.gradient_checkpointing is True
    assert plan("mqa", None).recipe.gradient_checkpointing == "finetune"  # blocks of 2048 >= CHECKPOINT_FROM
    for bad in (0, -5, 1.5, "576"):
        with pytest.raises(ValueError, match=r"width must be hidden size x layers, an int >= 1"):
            plan("mqa", bad)
    tiny = activation_width(LlamaConfig(hidden_size=64, num_hidden_layers=2))
    assert plan("hedgehog", tiny, seq_len=128).recipe.gradient_checkpointing is False
