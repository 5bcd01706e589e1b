"""Kernel tests run in Triton's interpreter on CPU tensors.

Triton 3.9 reads TRITON_INTERPRET when `triton.jit` decorates a function; our kernels are decorated lazily at
their first launch (`hf_fastattn.kernels._jit`), so setting it here, before any launch, is enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
