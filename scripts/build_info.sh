#!/usr/bin/env bash
# What `pip install` of sapa-jax is about to build, and why: the CPU module always; the CUDA
# module when nvcc is found (SAPA_CUDA=AUTO, the default) or required (SAPA_CUDA=ON), for the
# architectures in SAPA_CUDA_ARCHITECTURES (default: CMakeLists.txt's four). Sourced by demo.sh
# and test.sh, which pass "${SAPA_PIP_ARGS[@]}" to pip; run alone it only prints.

SAPA_DEFAULT_ARCHITECTURES="80-real 86-real 89-real 90"

# nvcc as CMakeLists.txt looks for it: $CUDACXX, $CUDA_HOME/bin, then PATH.
sapa_find_nvcc() {
  if [ -n "${CUDACXX:-}" ] && [ -x "${CUDACXX}" ]; then echo "${CUDACXX}"; return; fi
  if [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ]; then echo "${CUDA_HOME}/bin/nvcc"; return; fi
  command -v nvcc 2>/dev/null || true
}

sapa_build_info() {
  local mode="${SAPA_CUDA:-AUTO}" nvcc
  nvcc="$(sapa_find_nvcc)"
  SAPA_PIP_ARGS=()
  echo "sapa-jax build: CPU module: yes"
  if [ "$mode" = OFF ]; then
    echo "sapa-jax build: CUDA module: no (SAPA_CUDA=OFF)"
    return 0
  fi
  if [ -z "$nvcc" ]; then
    if [ "$mode" = ON ]; then
      echo "sapa-jax build: SAPA_CUDA=ON but nvcc was not found (set CUDACXX or CUDA_HOME, or add it to PATH)" >&2
      return 1
    fi
    echo "sapa-jax build: CUDA module: no (nvcc not found; install the CUDA toolkit and rebuild to get the GPU kernel)"
    return 0
  fi
  local archs="${SAPA_CUDA_ARCHITECTURES:-}" why
  if [ -n "$archs" ]; then
    why="SAPA_CUDA_ARCHITECTURES"
    SAPA_PIP_ARGS+=("--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=${archs}")
  else
    # pip reuses the CMake cache in build/: an architecture set by an earlier build stays.
    local cached
    cached="$(grep -hs '^CMAKE_CUDA_ARCHITECTURES:' build/*/CMakeCache.txt | head -n 1 | cut -d= -f2- || true)"
    if [ -n "$cached" ]; then
      archs="$cached"
      why="kept from an earlier build's CMake cache in build/; remove build/ for the default"
    else
      archs="$SAPA_DEFAULT_ARCHITECTURES"
      why="the default"
    fi
  fi
  echo "sapa-jax build: CUDA module: yes (SAPA_CUDA=$mode, $nvcc: $("$nvcc" --version | grep -o 'release [0-9.]*' | head -n 1 || true))"
  echo "sapa-jax build: CUDA architectures: $archs ($why)"
  echo "sapa-jax build: compiling CUDA takes minutes (about 2 on 2 cores for the four default"
  echo "  architectures, ~20 s without CUDA); SAPA_CUDA=OFF builds CPU-only,"
  echo "  SAPA_CUDA_ARCHITECTURES=90 (your GPU's compute capability) builds one architecture"
}

# After the install: what was built and whether it can run here.
sapa_report_built() {
  python - <<'PY'
import sapa_jax
for platform, status in sapa_jax.ffi_status().items():
    note = f" ({status.reason})" if status.reason else ""
    print(f"sapa-jax installed: {platform} kernel built={status.built} usable={status.usable}{note}")
PY
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  sapa_build_info
fi
