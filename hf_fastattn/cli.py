"""The `hf-fastattn` command line: one sub-command a module, imported only when used.

    hf-fastattn demo [--quick] [--model PATH_OR_HUB_ID]
    hf-fastattn bench {attention,decode,jacobi,conversion,kernels} [options]
    hf-fastattn convert SRC --method ... --out DIR
    hf-fastattn generate MODEL --prompt TEXT [--mode lookahead]
    hf-fastattn ddgviz MODEL --prompt TEXT
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code
COMMANDS = {
    "demo": "hf_fastattn.demo:main",
    "convert": "hf_fastattn.conversion.cli:main",
    "generate": "hf_fastattn.generation.cli:generate_main",
    "ddgviz": "hf_fastattn.generation.cli:ddgviz_main",
}
BENCHMARKS = ("attention", "decode", "jacobi", "conversion", "kernels")


def _usage() -> str:
    names = ", ".join([*COMMANDS, "bench"])
    return f"usage: hf-fastattn COMMAND [options]   (COMMAND is one of: {names}; add --help to any)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"hf-fastattn bench: choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        target = f"hf_fastattn.bench.{rest[0]}:main"
        rest = rest[1:]
    elif command in COMMANDS:
        target = COMMANDS[command]
    else:
        print(f"hf-fastattn: unknown command {command!r}. {_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
