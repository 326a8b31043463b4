# Sourced by ./run.sh and ./test.sh: create or reuse the project's virtual environment.
#
#   layerscope_venv EXTRAS     # e.g. "" or "test,slurm"; sets LAYERSCOPE_PYTHON
#
# The environment lives in $LAYERSCOPE_VENV (default: .venv beside this repository). It is reused as is
# when the stamp it carries matches: pyproject.toml's hash, the Python version, the torch build and the
# extras. Otherwise it is created or updated: the torch build for this machine first (the CUDA build where
# nvidia-smi lists a GPU, else the CPU build; an unpinned torch would pull a multi-GB CUDA build), then
# layerscope in editable mode with the extras. Set LAYERSCOPE_EXTRAS to add extras (e.g. "gpu" for vLLM,
# "quant"), LAYERSCOPE_TORCH_BUILD=cpu|cuda to override the detection.

LAYERSCOPE_TORCH_VERSION=2.13.0
LAYERSCOPE_TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

layerscope_venv() {
    local root venv python extras build stamp want
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    venv=${LAYERSCOPE_VENV:-$root/.venv}
    python=${PYTHON:-python3}
    extras=$1
    if [[ -n ${LAYERSCOPE_EXTRAS:-} ]]; then extras=${extras:+$extras,}$LAYERSCOPE_EXTRAS; fi
    build=${LAYERSCOPE_TORCH_BUILD:-}
    if [[ -z $build ]]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
            build=cuda
        else
            build=cpu
        fi
    fi
    command -v "$python" >/dev/null 2>&1 || { echo "layerscope: $python not found (Python >= 3.11 is needed)" >&2; return 1; }
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "layerscope: $python is older than Python 3.11" >&2; return 1; }
    want="pyproject=$(sha256sum "$root/pyproject.toml" | cut -c1-16) python=$("$python" -c 'import platform; print(platform.python_version())') torch=$LAYERSCOPE_TORCH_VERSION/$build extras=$extras"
    stamp="$venv/.layerscope-stamp"
    if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        echo "layerscope: reusing $venv ($want)" >&2
    else
        echo "layerscope: setting up $venv ($want)" >&2
        [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
        rm -f "$stamp"
        "$venv/bin/python" -m pip install -q --upgrade pip
        if [[ $build == cpu ]]; then
            # the CPU wheel (version +cpu) from PyTorch's index where that host can be reached; else the
            # configured indexes (an offline mirror, or PyPI, whose Linux wheel is the larger CUDA build)
            local extra=()
            if "$python" -c 'import socket, sys, urllib.parse as u; h = u.urlparse(sys.argv[1]).hostname; socket.create_connection((h, 443), timeout=5).close()' \
                    "$LAYERSCOPE_TORCH_CPU_INDEX" 2>/dev/null; then
                extra=(--extra-index-url "$LAYERSCOPE_TORCH_CPU_INDEX")
            fi
            "$venv/bin/python" -m pip install -q "torch==$LAYERSCOPE_TORCH_VERSION" "${extra[@]}"
        else
            "$venv/bin/python" -m pip install -q "torch==$LAYERSCOPE_TORCH_VERSION"
        fi
        "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}"
        echo "$want" > "$stamp"
    fi
    LAYERSCOPE_PYTHON=$venv/bin/python
}
