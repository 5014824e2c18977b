#!/usr/bin/env bash
# Install sapa-jax with the example extras and run the main demo: the small configuration of the
# segmentation experiment (one FPN network, only the upsampler changes: nearest, bilinear, deconv,
# CARAFE, SAPA-I/B/P/G; SAPA-D on request), compared on mIoU and boundary IoU with paired CIs vs bilinear.
# Extra arguments go to the example, e.g. `bash scripts/demo.sh --steps 100` (a rerun into the
# same output folder needs --overwrite or --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "jax>=0.10.2" "pybind11>=2.12" "scikit-build-core>=0.10"
# shellcheck source=scripts/build_info.sh
source scripts/build_info.sh
sapa_build_info   # prints what is built (CPU, CUDA and for which architectures) and why
python -m pip install -q --no-build-isolation ${SAPA_PIP_ARGS[@]+"${SAPA_PIP_ARGS[@]}"} -e ".[examples]"
sapa_report_built
python -m examples.segmentation "$@"
