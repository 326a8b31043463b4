#!/usr/bin/env bash
# Set up (or reuse) .venv and run the default pipeline: ./run.sh [snakemake arguments...]
#   ./run.sh                          # snakemake --cores all on config.yaml
#   ./run.sh --resources gpu=2        # arguments are passed through to snakemake
#   ./run.sh --configfile my.yaml -n  # a dry run of another config
set -euo pipefail
cd "$(dirname "$0")"
. envs/bootstrap.sh
layerscope_venv ""
exec "$LAYERSCOPE_PYTHON" -m snakemake --cores all "$@"
