#!/usr/bin/env bash
# Install sapa-jax (building its C++/CUDA FFI kernels) with the test extras, then run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The kernels are built against the FFI headers of the jaxlib that will run them, hence
# --no-build-isolation and the build requirements installed first.
python -m pip install -q "jax>=0.10.2" "pybind11>=2.12" "scikit-build-core>=0.10"
# shellcheck source=scripts/build_info.sh
source scripts/build_info.sh
sapa_build_info   # prints what is built (CPU, CUDA and for which architectures) and why
python -m pip install -q --no-build-isolation ${SAPA_PIP_ARGS[@]+"${SAPA_PIP_ARGS[@]}"} -e ".[test,examples]"
sapa_report_built
python -m pytest -q "$@"
