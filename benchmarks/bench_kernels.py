"""Triton kernels vs SDPA / FlashAttention / fla on a GPU; same as `hf-fastattn bench kernels` (--quick: CPU smoke)."""

import sys

from hf_fastattn.showcase.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
