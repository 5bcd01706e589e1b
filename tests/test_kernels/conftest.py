"""Kernel tests run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set by the root conftest, before
triton is first imported (triton's own library is decorated in the mode of that moment)."""
