#!/usr/bin/env bash
# The GPU path in one command (README "Backends"): every Triton and CUDA kernel
# against its oracle, then the benches' GPU rows. Needs a CUDA device and a
# CUDA build of torch (plus triton, and nvcc for the cuda backend at install).
# Sized for under eight minutes on one H100/H200 (mostly Triton's first
# compiles; not yet timed on a GPU); stops at the first failure.
#   bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
"$PY" -c "from fisherfast.ops import available_backends as a; print(*a().values(), sep='\n')"
# 1. Model-scale kernels vs float64 oracles (marker gpu).
"$PY" -m pytest -q -x -m gpu tests/ops
# 2. The backend-parametrized op tests, whose triton/cuda cases now run on CUDA tensors.
"$PY" -m pytest -q -x tests/ops -m "not gpu and not slow" -k "triton or cuda"
# 3. GPU rows of the op benches (each checks its result before timing).
"$PY" bench/bench_softmax_fisher.py --gpu-only
"$PY" bench/bench_fwht.py --quick
"$PY" bench/bench_sketch.py --quick
echo "gpu_check: all GPU kernels agree with their oracles"
