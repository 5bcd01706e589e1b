"""Per-token decode latency and cache size against the context, sdpa vs linear vs fast.

Same as `hf-fastattn bench decode`.
"""

import sys

from hf_fastattn.showcase.bench.decode import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
