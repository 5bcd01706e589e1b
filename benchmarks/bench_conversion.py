"""Conversion benchmark: `python benchmarks/bench_conversion.py [--quick]` (same as `hf-fastattn bench conversion`)."""

import sys

from hf_fastattn.showcase.bench.conversion import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
