"""Jacobi decoding modes against greedy generate (time, forward passes); same as `hf-fastattn bench jacobi`."""

import sys

from hf_fastattn.showcase.bench.jacobi import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
