#!/usr/bin/env bash
# The checks to run when a CUDA GPU is at hand, in one go: the kernel tests on the compiled Triton kernels (not the
# interpreter CI runs them in), a tiny model of each attention implementation on CUDA against the CPU's torch path,
# and `hf-fastattn bench kernels` (sdpa, fla if installed, ours). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Wheels in .whl/ (for a machine that cannot reach a package index: transformers and what it needs, fla) are
# installed into /tmp/site first when present. Each step has its own time limit so that one hang leaves the others.
set -u
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 -c "import transformers, hf_fastattn" && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
python3 -c "import torch, triton, transformers, hf_fastattn; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT_DIR/versions.txt"
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1 | tee -a "$OUT_DIR/versions.txt"

# the CPU kernel (rows_linear) is tested on CPU machines; everything else in tests/test_kernels runs on CUDA here
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --timeout 90 -rfEs tests/test_kernels \
    --ignore=tests/test_kernels/test_rows_linear.py 2>&1 | tee "$OUT_DIR/kernel_tests.log" | tail -60

# ours against sdpa first; fla apart (its first calls autotune for minutes), so a time limit on it costs ours nothing
timeout "${BENCH_TIMEOUT:-160}" python3 -m hf_fastattn.cli bench kernels --methods sdpa linear linear-torch fast-1 fast-2 sparse \
    --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log" | tail -40
if python3 -c "import fla.ops.linear_attn" >/dev/null 2>&1; then
    timeout "${FLA_TIMEOUT:-100}" python3 -m hf_fastattn.cli bench kernels --methods sdpa linear fla_linear \
        --out "$OUT_DIR/fla" 2>&1 | tee "$OUT_DIR/bench_fla.log" | tail -25
fi
