"""The README's two commands are the ones CI runs, and the CLI entry point they name exists."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_command, test_command = commands
    assert main_command.startswith("pip install -e . && hf-fastattn ")
    assert "pytest" in test_command


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


def test_main_command_names_a_real_subcommand():
    from hf_fastattn.cli import BENCHMARKS, COMMANDS

    args = shlex.split(readme_commands()[0].split("&&", 1)[1])
    assert args[0] == "hf-fastattn"
    assert args[1] in COMMANDS or (args[1] == "bench" and args[2] in BENCHMARKS)


def test_readme_recurrent_example_uses_the_current_cache_name():
    """The README's continuation snippet, run as written (transformers 5.24 renamed `past_key_values` to `cache`
    and warns on the old name): no deprecation warning, and continuing equals one longer generate."""
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fastattn

    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\ncache = hf_fastattn.RecurrentCache\(model\).*?```", text, flags=re.S).group(0)
    assert "past_key_values" not in snippet
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("linear")
    model.generation_config.do_sample = False
    ids = torch.randint(3, 90, (1, 10))
    scope = {"hf_fastattn": hf_fastattn, "model": model, "ids": ids}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        exec(snippet.strip("`").removeprefix("python\n"), scope)
        assert scope["more"].tolist() == model.generate(ids, max_new_tokens=64).tolist()
