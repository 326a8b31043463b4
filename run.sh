#!/usr/bin/env bash
# Set up (or reuse) .venv and run the default pipeline: ./run.sh [snakemake arguments...]
#   ./run.sh                          # snakemake --cores all on config.yaml
#   ./run.sh --resources gpu=2        # arguments are passed through to snakemake
#   ./run.sh --configfile my.yaml -n  # a dry run of another config
set -euo pipefail
cd "$(dirname "$0")"
. envs/bootstrap.sh
layerscope_venv ""
# the default config's wordnet_alignment reads Debian's WordNet database (wordnet-base)
if grep -q "^  wordnet_alignment:" config.yaml && [[ ! -f /usr/share/wordnet/data.noun ]]; then
    bash envs/wordnet.sh install || {
        echo "layerscope: config.yaml runs wordnet_alignment, which needs WordNet at /usr/share/wordnet:" \
             "install Debian's wordnet-base (sudo envs/wordnet.sh install), or point" \
             "experiments.wordnet_alignment.wordnet at a WordNet 3.x database folder, or remove the block" >&2
        exit 1
    }
fi
exec "$LAYERSCOPE_PYTHON" -m snakemake --cores all "$@"
