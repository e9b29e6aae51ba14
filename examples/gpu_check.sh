#!/usr/bin/env bash
# Everything only a GPU can show, in one call (examples/gpu_check.py has the rows): on the GPU machine
#   bash examples/gpu_check.sh --output gpu_check.md
# and a CPU dry run of the same steps (what CI runs):
#   bash examples/gpu_check.sh --cpu --output /tmp/gpu_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/gpu_check.py "$@"
