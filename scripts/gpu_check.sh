#!/usr/bin/env bash
# Everything about the CUDA kernels that needs a GPU, in steps that each fit a 10-minute slot.
#
#   bash scripts/gpu_check.sh [REPORT_DIR] [STEP ...]     steps: build tests simple sanitize bench
#
# build     install the package with the CUDA module required (pip -e, no build isolation: the
#           GPU machine has jax, pybind11, scikit-build-core, cmake and nvcc but no registry)
# tests     tests/test_gpu.py (FFI vs jnp and vs torch on the GPU, every path and dtype)
# simple    the same with SAPA_CUDA_FORCE_SIMPLE=1 (test_gpu.py then sets the module's planner
#           to the fallback kernels on every shape)
# sanitize  compute-sanitizer racecheck, synccheck, memcheck and initcheck on scripts/cuda_probe.py
# bench     benchmarks/bench_core.py --preset gpu in float32 and bfloat16
#
# Logs and JSON go to REPORT_DIR (default gpu_report); SUMMARY there lists each step's exit code.
# A failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-gpu_report}
shift || true
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build tests simple sanitize bench)
mkdir -p "$REPORT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

step() {  # step NAME COMMAND...: runs it, logs to REPORT/NAME.log, records the exit code
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$REPORT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name $rc" >>"$REPORT/SUMMARY"
  echo "=== $name: exit $rc"
}

for s in "${STEPS[@]}"; do
  case $s in
    build)
      nvidia-smi -L >"$REPORT/device.txt" 2>&1
      SAPA_CUDA=ON step build "$PY" -m pip install -q --no-build-isolation -e . ;;
    tests)
      step tests "$PY" -m pytest -q -rs tests/test_gpu.py ;;
    simple)
      SAPA_CUDA_FORCE_SIMPLE=1 step simple "$PY" -m pytest -q -rs tests/test_gpu.py ;;
    sanitize)
      for tool in racecheck synccheck memcheck initcheck; do
        step "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 99 \
          "$PY" scripts/cuda_probe.py
      done ;;
    bench)
      for dtype in float32 bfloat16; do
        step "bench-$dtype" "$PY" benchmarks/bench_core.py --preset gpu --dtype "$dtype" \
          --json "$REPORT/bench-$dtype.json"
      done ;;
    *)
      echo "unknown step $s (build tests simple sanitize bench)" >&2
      exit 2 ;;
  esac
done
cat "$REPORT/SUMMARY"
