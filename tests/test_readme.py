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
