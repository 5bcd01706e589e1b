"""Kernel tests run the compiled kernels on CUDA tensors where a GPU is available, and Triton's interpreter on CPU
tensors otherwise: the root conftest sets TRITON_INTERPRET=1 only without a GPU, before triton is first imported
(triton's own library is decorated in the mode of that moment). `helpers.DEVICE` is the device the tests use."""
