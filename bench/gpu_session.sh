#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a lent GPU machine that has torch, triton and
# transformers but no lmforge install and no registry access. Run from the repo root:
#
#   bash bench/gpu_session.sh [quick]      # quick: tests + decode roofline only
#
# pytest comes from .gpu-wheels/ when the machine lacks it (`make gpu-wheels` fills that folder
# here; carry it along). Results land in bench/results/ and, when $OUT is set, are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import pytest" 2>/dev/null; then
  python -m pip install -q --no-index --find-links .gpu-wheels pytest pytest-timeout
fi
# The repo root is the `lmforge` package: put a link named lmforge on the path (no install).
link_dir=$(mktemp -d)
ln -s "$PWD" "$link_dir/lmforge"
export PYTHONPATH="$link_dir${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

status=0
run() { echo "+ $*" >&2; "$@" || status=1; }

# Kernels vs their torch references on the GPU, the GPU-marked engine checks (Triton vs torch
# backend, CUDA graphs vs eager), then the benchmarks.
run python -m pytest -q -p no:cacheprovider tests/kernels tests/runtime/engine/test_triton_backend.py \
    tests/runtime/engine/test_cuda_graph.py tests/bench
run python -m bench.decode_roofline --save
if [[ "${1:-}" != quick ]]; then
  run python -m bench.decode_roofline --enforce-eager --skip-hf --save
  run python -m bench.kernel_bench --save
  run python -m bench.moe --w4a16 --save
  run python -m bench.throughput --save
  run python -m bench.throughput --shape llama-3.1-8b --skip-hf --save
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results" && cp bench/results/*.json "$OUT/results/" 2>/dev/null
fi
exit $status
