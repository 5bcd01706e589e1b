"""`hf-fastattn convert`: runs end to end on a tiny model, never touches SRC, clear errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_fastattn.cli import main as cli_main


def _hashes(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def src(tmp_path, tokenizer):
    path = tmp_path / "src"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def train_file(tmp_path, text):
    path = tmp_path / "train.txt"
    path.write_text(text[:20_000])
    return path


@pytest.mark.parametrize("method,recipe", [("hedgehog", []), ("t2r", ["--recipe", "t2r-hybrid"])])
def test_convert_cli_end_to_end(tmp_path, src, train_file, capsys, method, recipe):
    """The budget in steps (--max-steps, --transfer-steps) still works, with flags over the recipe's values."""
    before = _hashes(src)
    out = tmp_path / "out"
    argv = [
        "convert",
        str(src),
        "--method",
        method,
        *recipe,
        "--hybrid",
        "--window",
        "16",
        "--train-file",
        str(train_file),
    ]
    argv += [
        "--max-steps",
        "2",
        "--transfer-steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity before" in printed and f"after conversion ({method})" in printed
    assert _hashes(src) == before
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "HfFastattnLlamaForCausalLM"
    assert {k: model.config.fastattn[k] for k in ("feature_map", "window")} == {"feature_map": "elu", "window": 16}
    assert model.config.fastattn_conversion["method"] == method and model.config.fastattn_conversion["hybrid"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "performer"], "valid methods are"),
        (["--method", "mqa", "--hybrid"], "do not apply to method 'mqa'"),
        (["--method", "gqa", "--num-key-value-heads", "3"], "--num-key-value-heads 3 must divide the 4 key/value"),
        (["--method", "t2r", "--feature-dim", "0"], "argument --feature-dim: must be at least 1, got 0"),
        (["--method", "t2r", "--hybrid", "--score-weight", "1"], "not with --hybrid"),
        (["--method", "fast", "--score-weight", "1"], "do not apply to method 'fast'"),
        (["--method", "t2r", "--transfer-steps", "1", "--score-weight", "-1"], "argument --score-weight"),
        (["--method", "t2r", "--recipe", "fastest"], "unknown recipe 'fastest'; valid recipes are ["),
        (["--method", "mqa", "--recipe", "hedgehog"], "recipe 'hedgehog' converts with method 'hedgehog', not 'mqa'"),
        (["--recipe", "mqa", "--max-tokens", "100"], "argument --max-tokens: not allowed with argument --max-steps"),
        (["--method", "t2r", "--hybrid"], "not with --hybrid (score 1.0 from recipe 't2r', hybrid from --hybrid)"),
        (["--method", "t2r", "--transfer-fraction", "0.5"], "--transfer-fraction splits --max-tokens"),
        (["--method", "t2r", "--max-steps", "-1"], "argument --max-steps: must be at least 0, got -1"),
        (["--method", "t2r", "--transfer-steps", "-2"], "argument --transfer-steps: must be at least 0, got -2"),
        (["--method", "t2r", "--seq-len", "0"], "argument --seq-len: must be at least 2, got 0"),
        (["--method", "t2r", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--method", "t2r", "--lr", "0"], "argument --lr: must be a finite number in (0, inf)"),
        (["--method", "t2r", "--val-fraction", "1"], "argument --val-fraction: must be a finite number in (0, 1)"),
        (["--method", "t2r", "--max-steps", "many"], "argument --max-steps: expected an integer, got 'many'"),
    ],
    ids=[
        "method",
        "option",
        "gqa-groups",
        "feature-dim",
        "score-hybrid",
        "score-fast",
        "score-negative",
        "unknown-recipe",
        "recipe-of-another-method",
        "two-budgets",
        "recipe-score-hybrid",
        "fraction-with-steps",
        "max-steps",
        "transfer-steps",
        "seq-len",
        "batch-size",
        "lr",
        "val-fraction",
        "max-steps-text",
    ],
)
def test_convert_cli_errors(tmp_path, src, train_file, capsys, monkeypatch, extra, message):
    """Each mistake is one line on stderr naming the flag, exit code 2, found before the model is loaded."""
    _forbid_model_loading(monkeypatch)
    before = _hashes(src)
    argv = [
        "convert",
        str(src),
        "--train-file",
        str(train_file),
        "--max-steps",
        "1",
        *extra,
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _hashes(src) == before
    assert not (tmp_path / "o").exists()


def _forbid_model_loading(monkeypatch):
    """Make any model loading fail the test: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


def test_convert_cli_bad_paths(tmp_path, src, train_file, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("config loaded"))
    common = ["--method", "linear", "--max-steps", "1", "--out", str(tmp_path / "o")]
    missing = str(tmp_path / "missing")
    assert cli_main(["convert", missing, "--train-file", str(train_file), *common]) == 2
    assert f"SRC {missing!r}: no such local folder" in capsys.readouterr().err
    assert cli_main(["convert", str(src), "--train-file", str(tmp_path / "nope.txt"), *common]) == 2
    assert "--train-file" in capsys.readouterr().err
    assert (
        cli_main(
            ["convert", str(src), "--train-file", str(train_file), "--method", "linear", "--max-steps", "0",
             "--out", str(src)]
        )
        == 2
    )
    assert "--out must differ from SRC" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method,loss",
    [
        ("t2r", "attention_score_loss"),  # Hedgehog's score loss in pure t2r's attention transfer
        ("mqa", "softmax_score_loss"),  # the pooled model's softmax weights against the original's, layer transfer
    ],
)
def test_convert_cli_score_weight_reaches_stage_one(tmp_path, src, train_file, monkeypatch, method, loss):
    """--score-weight adds the method's attention-score loss to stage 1 (each layer, each step)."""
    import hf_fastattn.conversion.losses as losses

    calls = []
    real = getattr(losses, loss)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, loss, spy)
    argv = ["convert", str(src), "--method", method, "--train-file", str(train_file), "--transfer-steps", "2",
            "--score-weight", "0.5", "--max-steps", "0", "--seq-len", "32", "--batch-size", "2",
            "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 0
    assert len(calls) == 2 * 2  # 2 steps x 2 layers
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.fastattn_conversion["method"] == method


def _quick_argv(src, train_file, out, *extra):
    return ["convert", str(src), "--method", "linear", "--train-file", str(train_file), "--max-steps", "0",
            "--seq-len", "32", "--batch-size", "2", "--out", str(out), *extra]


def test_convert_cli_refuses_out_that_is_a_file(tmp_path, src, train_file, capsys, monkeypatch):
    """transformers only logs that --out should be a folder and saves nothing; the command must refuse up front."""
    _forbid_model_loading(monkeypatch)
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert cli_main(_quick_argv(src, train_file, out)) == 2
    captured = capsys.readouterr()
    assert f"--out {str(out)!r} is a file" in captured.err and "saved to" not in captured.out
    assert out.read_text() == "keep me"
    below = out / "model"  # a folder below a file cannot be created either
    assert cli_main(_quick_argv(src, train_file, below)) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_convert_cli_non_empty_out(tmp_path, src, train_file, capsys):
    """A non-empty folder that is not an earlier output is refused (naming --overwrite); with --overwrite the model
    is written beside the user's files, which stay as they were; an earlier output is replaced without asking."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    assert cli_main(_quick_argv(src, train_file, out)) == 2
    err = capsys.readouterr().err
    assert "is a non-empty folder" in err and "notes.md" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]

    assert cli_main(_quick_argv(src, train_file, out, "--overwrite")) == 0
    assert (out / "notes.md").read_text() == "my notes" and (out / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.fastattn_conversion["method"] == "linear"
    capsys.readouterr()

    # now an earlier output of ours: a second run replaces it, and says so
    assert cli_main([*_quick_argv(src, train_file, out)[:3], "mqa", *_quick_argv(src, train_file, out)[4:]]) == 0
    assert "holds an earlier conversion (method 'linear')" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.fastattn_conversion["method"] == "mqa"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(_quick_argv(src, train_file, empty)) == 0
    assert (empty / "config.json").is_file()


def test_convert_cli_out_inside_src(tmp_path, src, train_file, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    before = _hashes(src)
    assert cli_main(_quick_argv(src, train_file, src / "converted")) == 2
    assert "lies inside SRC" in capsys.readouterr().err
    assert _hashes(src) == before


def test_convert_cli_checks_the_text_before_the_model(tmp_path, src, train_file, capsys, monkeypatch):
    """An empty or too short --train-file, a folder given as one, or a --val-fraction that leaves nothing are
    reported, naming the flag, before the model's weights are loaded."""
    _forbid_model_loading(monkeypatch)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    cases = [
        (empty, [], f"--train-file {str(empty)!r} is empty"),
        (tmp_path, [], "is a folder; give a text file"),
        (tmp_path / "nope.txt", [], "no such file"),
        (short, [], "fewer than one block of --seq-len 32"),
        (train_file, ["--seq-len", "100000"], "fewer than one block of --seq-len 100000"),
        (train_file, ["--val-fraction", "1e-9"], "leaves no validation text"),
    ]
    for path, extra, message in cases:
        assert cli_main(_quick_argv(src, path, tmp_path / "o", *extra)) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_convert_cli_says_when_nothing_was_saved(tmp_path, src, train_file, capsys, monkeypatch):
    """Should saving still write nothing (transformers only logs), no "saved to" and exit code 1."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, *a, **k: None)
    assert cli_main(_quick_argv(src, train_file, tmp_path / "o")) == 1
    captured = capsys.readouterr()
    assert "nothing was saved" in captured.err and "saved to" not in captured.out


def test_convert_cli_seq_len_beyond_learned_positions(tmp_path, tokenizer, train_file, capsys, monkeypatch):
    """GPT-2 has a table of 256 positions (tiny config): a longer --seq-len would fail after loading and evaluating."""
    src = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(src)
    tokenizer.save_pretrained(src)
    _forbid_model_loading(monkeypatch)
    assert cli_main(_quick_argv(src, train_file, tmp_path / "o", "--seq-len", "300")) == 2
    assert "--seq-len 300 exceeds the 256 positions of SRC (gpt2)" in capsys.readouterr().err


# learned absolute positions, read from the model: checked against what the model itself accepts

POSITION_FAMILIES = ["gpt2", "opt", "biogpt", "bert", "roberta", "electra", "llama"]


def _tiny_of_type(model_type: str, positions: int):
    from transformers import AutoConfig, AutoModel

    sizes = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=positions, n_positions=positions, ffn_dim=32, word_embed_proj_dim=16,
                 embedding_size=16, pad_token_id=1)
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **sizes)).eval()


@pytest.mark.parametrize("model_type", POSITION_FAMILIES)
def test_learned_position_limit_is_what_the_model_accepts(model_type):
    """The limit (None for RoPE) is read from the model: a sequence of that many tokens runs, one more fails inside
    the model (OPT and BioGPT offset their table by 2, RoBERTa's ids start after padding_idx = 1)."""
    from hf_fastattn.conversion.families import learned_position_limit

    model = _tiny_of_type(model_type, 24)
    limit = learned_position_limit(model)
    assert limit == learned_position_limit(model.config)  # the config alone (meta device) says the same
    ids = lambda n: torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(0))  # no pad token
    with torch.no_grad():
        if limit is None:  # RoPE: no table, longer sequences run
            model(ids(2 * 24))
            return
        assert limit in (22, 24)
        model(ids(limit))
        with pytest.raises((IndexError, RuntimeError)):
            model(ids(limit + 1))


def test_convert_cli_seq_len_beyond_opt_positions(tmp_path, tokenizer, train_file, capsys, monkeypatch):
    """The check is not a list of families: OPT's table (64 positions, stored as 66 rows with its offset of 2)
    refuses --seq-len 65 before any model is loaded; a RoPE model (Llama) passes every check with a --seq-len beyond
    its max_position_embeddings and goes on to load the model."""
    from transformers import OPTConfig, OPTForCausalLM

    src = tmp_path / "opt"
    config = OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=64)
    OPTForCausalLM(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    _forbid_model_loading(monkeypatch)
    assert cli_main(_quick_argv(src, train_file, tmp_path / "o", "--seq-len", "65")) == 2
    err = capsys.readouterr().err
    assert "--seq-len 65 exceeds the 64 positions of SRC (opt)" in err and "--seq-len 64 or less" in err

    llama = tmp_path / "llama"
    tiny_model("llama", max_position_embeddings=16).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    with pytest.raises(AssertionError, match="a model was loaded"):  # past every check, on to loading the model
        cli_main(_quick_argv(llama, train_file, tmp_path / "o2", "--seq-len", "32"))
    assert "exceeds" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the recipes are the CLI's defaults


def _plan_of(*argv, context=None):
    from hf_fastattn.conversion import cli

    args = cli.build_parser().parse_args(["SRC", "--train-file", "t.txt", "--out", "o", *argv])
    return cli.make_cli_plan(args, cli.method_of(args), context=context)


@pytest.mark.parametrize("method", ["t2r", "hedgehog", "linear", "fast", "mqa", "gqa"])
def test_each_method_defaults_to_its_recipe(method):
    """With no flag but the budget, the command line's settings are `RECIPES[method]`, field for field, and the
    budget is split by the recipe's share and batch sizes."""
    import dataclasses

    from hf_fastattn.conversion.recipes import RECIPES
    from hf_fastattn.conversion.uptraining import native_bf16

    # the recipe's blocks are the model's context: 256 positions here (the tiny models'), at most MAX_SEQ_LEN
    recipe = dataclasses.replace(RECIPES[method], seq_len=256)
    plan = _plan_of("--method", method, "--max-tokens", "204800", context=256)
    expected = {
        "seq_len": "the model's context (256 positions), at most 2048",
        "gradient_checkpointing": "blocks of 256 tokens (< 1024)",
    }
    bf16 = recipe.bf16
    if bf16 is None:  # the mqa / gqa recipes: bfloat16 where the hardware has it
        bf16, expected["bf16"] = native_bf16()
    assert plan.name == method and plan.sources == expected
    resolved = dataclasses.replace(recipe, gradient_checkpointing=False, bf16=bf16)
    assert dataclasses.asdict(plan.recipe) == dataclasses.asdict(resolved)
    blocks = 204800 // recipe.seq_len
    transfer = int(blocks * recipe.transfer) // recipe.transfer_batch
    assert plan.transfer_steps == transfer
    assert plan.finetune_steps == (blocks - transfer * recipe.transfer_batch) // recipe.batch
    assert plan.tokens <= 204800 and plan.transfer_steps + plan.finetune_steps > 0


def test_flags_override_the_recipe_and_say_so():
    import dataclasses

    from hf_fastattn.conversion.recipes import RECIPES

    plan = _plan_of("--method", "hedgehog", "--max-tokens", "10k", "--lr", "0.01", "--batch-size", "4",
                    "--window", "16", "--seq-len", "64", "--no-hybrid")
    r = plan.recipe
    assert (r.lr, r.batch, r.transfer_batch, r.seq_len) == (0.01, 4, 4, 64)
    assert plan.options == {**RECIPES["hedgehog"].options, "window": 16, "hybrid": False}
    assert plan.sources == {"lr": "--lr", "batch": "--batch-size", "transfer_batch": "--batch-size",
                            "seq_len": "--seq-len", "window": "--window", "hybrid": "--no-hybrid",
                            "gradient_checkpointing": "blocks of 64 tokens (< 1024)"}
    assert plan.source("transfer_lr") == "recipe 'hedgehog'" and r.transfer_lr == RECIPES["hedgehog"].transfer_lr
    blocks = 10_000 // 64
    assert plan.transfer_steps == int(blocks * RECIPES["hedgehog"].transfer) // 4 and plan.max_tokens == 10_000
    # --recipe picks another, --method may then be left out
    other = _plan_of("--recipe", "t2r-hybrid", "--max-tokens", "1000", context=128)
    assert other.method == "t2r"
    assert other.recipe == dataclasses.replace(RECIPES["t2r-hybrid"], seq_len=128, gradient_checkpointing=False)
    # gradient checkpointing: on from 1024-token blocks (stage 2 only below 8192 tokens per stage-1 step), a flag
    # either way wins
    assert _plan_of("--method", "mqa", "--max-tokens", "1000", context=1024).recipe.gradient_checkpointing == "finetune"
    assert _plan_of("--method", "t2r", "--max-tokens", "1000", context=1024).recipe.gradient_checkpointing is True
    off = _plan_of("--method", "mqa", "--max-tokens", "1000", "--no-gradient-checkpointing", context=2048)
    assert off.recipe.gradient_checkpointing is False
    assert off.source("gradient_checkpointing") == "--no-gradient-checkpointing"
    on = _plan_of("--method", "mqa", "--max-tokens", "1000", "--gradient-checkpointing", context=128)
    assert on.recipe.gradient_checkpointing is True and on.uptrain_config().gradient_checkpointing is True
    # the context sets the default block length, at most MAX_SEQ_LEN; an explicit --seq-len wins
    assert _plan_of("--method", "mqa", "--max-tokens", "1000", context=8192).recipe.seq_len == 2048
    assert _plan_of("--method", "mqa", "--max-tokens", "1000").source("seq_len").startswith("the model states no")
    assert _plan_of("--method", "mqa", "--max-tokens", "1000", "--seq-len", "64", context=8192).recipe.seq_len == 64


def test_convert_cli_runs_the_default_recipe_with_the_teacher(tmp_path, src, train_file, capsys, monkeypatch):
    """`hf-fastattn convert SRC --method t2r --train-file TEXT --max-tokens N --out DIR`: t2r's default recipe (a
    "layer" transfer stage and distillation, both against the original model kept in memory) runs through the CLI;
    every setting is printed with its source and saved beside the weights; an explicit flag overrides its value."""
    import dataclasses
    import json

    from transformers import AutoConfig

    import hf_fastattn.conversion.distill as distill
    from hf_fastattn.conversion.recipes import RECIPE_FIELDS, RECIPES, activation_width

    teachers = []
    real = distill.DistillationTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        teachers.append(self.teacher)
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(distill.DistillationTrainer, "compute_loss", spy)
    before = _hashes(src)
    out = tmp_path / "out"
    # blocks of the model's context (256 positions): 6 blocks, 3 steps of layer transfer at batch 1, then 3 of
    # distillation at batch 1
    argv = ["convert", str(src), "--method", "t2r", "--train-file", str(train_file), "--max-tokens", "1536",
            "--feature-dim", "16", "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    recipe = dataclasses.replace(RECIPES["t2r"], seq_len=256, gradient_checkpointing=False)
    context = "the model's context (256 positions), at most 2048"
    width = activation_width(AutoConfig.from_pretrained(src))  # hidden size x layers, read from SRC by the CLI
    checkpointing = f"stage-2 steps of 1 x 256 tokens x {width} (hidden size x layers) = {256 * width:,} (< 40,000,000)"
    for name in RECIPE_FIELDS:  # each setting on its line, from the recipe (the block length from the model)
        source = {"seq_len": context, "gradient_checkpointing": checkpointing}.get(name, "recipe 't2r'")
        assert any(line.split()[:2] == [name, repr(getattr(recipe, name))] and source in line
                   for line in printed.splitlines()), name
    assert any(line.split()[:2] == ["feature_dim", "16"] and "--feature-dim" in line for line in printed.splitlines())
    saved = json.loads((out / "fastattn_recipe.json").read_text())
    assert saved["recipe"] == "t2r" and saved["method"] == "t2r"
    assert {name: saved[name] for name in RECIPE_FIELDS} == {name: getattr(recipe, name) for name in RECIPE_FIELDS}
    assert saved["options"] == {**recipe.options, "feature_dim": 16}
    assert saved["sources"] == {"feature_dim": "--feature-dim", "seq_len": context, "gradient_checkpointing": checkpointing}
    split = (saved["max_tokens"], saved["transfer_steps"], saved["finetune_steps"], saved["tokens"])
    assert split == (1536, 3, 3, 1536)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.fastattn_conversion == {**model.config.fastattn_conversion, "method": "t2r", "feature_dim": 16}
    # stage 2 distilled from the original model, which was neither converted nor trained (SRC untouched on disk)
    assert len(teachers) == 3 and all(t is teachers[0] for t in teachers)
    original = AutoModelForCausalLM.from_pretrained(src)
    assert type(teachers[0]).__name__ == "LlamaForCausalLM"
    for (name, p), q in zip(teachers[0].named_parameters(), original.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert _hashes(src) == before


def test_recipe_batch_sizes_are_checked_against_the_processes(monkeypatch):
    """Under `accelerate launch` each batch is split over the processes: t2r's recipe (batch 1) is refused on 2
    processes before anything loads, naming the flag that fixes it; --batch-size 2 passes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--batch-size 1 \(recipe 't2r'\) must be divisible by the 2 processes"):
        _plan_of("--method", "t2r", "--max-tokens", "1000")
    assert _plan_of("--method", "t2r", "--max-tokens", "1000", "--batch-size", "2").recipe.transfer_batch == 2


def test_convert_cli_encoder_runs_stage_one_of_the_default_recipe(tmp_path, tokenizer, train_file, capsys):
    """An encoder (BERT) has no LM head to fine-tune and no causal hybrid: hedgehog's default recipe runs its
    attention transfer on the whole budget, and the printout says why the two settings differ from the recipe."""
    import json

    from hf_fastattn.conversion.recipes import RECIPES

    src = tmp_path / "bert"
    tiny_model("bert").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "o"
    argv = ["convert", str(src), "--method", "hedgehog", "--train-file", str(train_file), "--max-tokens", "512",
            "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "encoder: no LM head to fine-tune" in printed and "encoder: the sliding-window hybrid" in printed
    saved = json.loads((out / "fastattn_recipe.json").read_text())
    assert (saved["finetune"], saved["options"]["hybrid"], saved["transfer_steps"], saved["finetune_steps"]) == (
        "none", False, 2 // RECIPES["hedgehog"].transfer_batch, 0)  # 2 blocks of the model's context (256 positions)
    assert saved["seq_len"] == 256
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out).config.fastattn_conversion["method"] == "hedgehog"
