"""The showcase: what demonstrates and measures the library, apart from it. `bench/` (the `hf-fastattn bench ...`
benchmarks), `demo*` (`hf-fastattn demo`) and `tinylm` (the small teacher trained here on the packaged corpus). The
core (ops, kernels, integration, conversion, generation) never imports it (`tests/test_import_structure.py`)."""
