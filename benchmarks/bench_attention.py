"""Attention operators against N (time, peak memory); same as `hf-fastattn bench attention`."""

import sys

from hf_fastattn.showcase.bench.attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
