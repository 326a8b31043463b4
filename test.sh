#!/usr/bin/env bash
# Set up (or reuse) .venv with the test extras and run the tests: ./test.sh [pytest arguments...]
#   ./test.sh                   # the whole suite
#   ./test.sh -m "not slow"     # without the end-to-end Snakemake runs
set -euo pipefail
cd "$(dirname "$0")"
. envs/bootstrap.sh
layerscope_venv "test,slurm"
exec "$LAYERSCOPE_PYTHON" -m pytest "$@"
