#!/usr/bin/env bash
# Install sapa-jax with the example extras and run the main demo: a segmentation network trained
# with each upsampler (nearest, bilinear, SAPA I/B/P/G), compared on mIoU and boundary IoU.
# Extra arguments go to the example, e.g. `bash scripts/demo.sh --steps 100`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "jax>=0.10.2" "pybind11>=2.12" "scikit-build-core>=0.10"
python -m pip install -q --no-build-isolation -e ".[examples]"
python -m examples.segmentation "$@"
