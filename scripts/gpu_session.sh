#!/usr/bin/env bash
# What a lent GPU machine should run, one step per device command (each stays under its 10-minute limit).
# Runs from a source checkout without installing (scripts/source_env.sh); torch, triton and transformers must
# already be there. Each step writes its results into docs/ and, when $OUT is set (the device tool's return
# folder), copies what it wrote there.
#
#   bash scripts/gpu_session.sh tests     # GPU-only tests: bf16 and large shapes, 2:4 / bitmap / nested kernels
#   bash scripts/gpu_session.sh kernels   # bench_kernels.py --paths: 2:4 and bitmap vs cuBLAS -> docs
#   bash scripts/gpu_session.sh nested    # bench_kernels.py --formats nested: the nested format per tier -> docs
#   bash scripts/gpu_session.sh engine    # bench_engine_gpu.py: 1.1B model, torch vs triton per tier -> docs
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
step="${1:-}"
PYTHONPATH="$(bash scripts/source_env.sh)"
export PYTHONPATH
py=(timeout 570 python3 -P)  # -P: the checkout's own sparsedial/ must not shadow the linked package

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
rc=0  # a failing step (or the timeout, 124) still returns what it wrote
case "$step" in
  tests)
    "${py[@]}" -m pytest tests/kernels -m gpu -q -rs > /tmp/gpu_tests.log 2>&1 || rc=$?
    cat /tmp/gpu_tests.log
    files=(/tmp/gpu_tests.log) ;;
  kernels)
    "${py[@]}" benchmarks/bench_kernels.py --paths || rc=$?
    files=(docs/benchmarks.md docs/bench_kernels_gpu.csv docs/bench_kernels_gpu.md) ;;
  nested)
    "${py[@]}" benchmarks/bench_kernels.py --formats nested || rc=$?
    files=(docs/benchmarks.md docs/bench_kernels_nested_gpu.csv docs/bench_kernels_nested_gpu.md) ;;
  engine)
    "${py[@]}" benchmarks/bench_engine_gpu.py --work /tmp/bench-engine-gpu || rc=$?
    files=(docs/benchmarks.md docs/bench_engine_gpu.csv docs/bench_engine_gpu.md) ;;
  *)
    echo "usage: bash scripts/gpu_session.sh tests|kernels|nested|engine" >&2
    exit 2 ;;
esac
if [[ -n "${OUT:-}" ]]; then
  for f in "${files[@]}"; do
    if [[ -f "$f" ]]; then cp "$f" "$OUT/"; fi
  done
fi
exit "$rc"
