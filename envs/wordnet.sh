#!/usr/bin/env bash
# Debian's WordNet 3.0 database (/usr/share/wordnet), for the wordnet_alignment experiment and its test on
# the real database (tests/experiments/geometry/test_wordnet_alignment.py).
#   envs/wordnet.sh install     # root: apt-get install wordnet-base (once per machine)
# Exit status 77 means "cannot install here", with the reason on stderr.
set -euo pipefail
PACKAGES=(wordnet-base)
cannot() { echo "wordnet: cannot install here: $*" >&2; exit 77; }
[[ ${1:-} == install ]] || { echo "usage: $0 install" >&2; exit 2; }
if [[ -f /usr/share/wordnet/data.noun && -f /usr/share/wordnet/index.noun ]]; then
    echo "wordnet: /usr/share/wordnet already installed" >&2; exit 0
fi
[[ $(id -u) == 0 ]] || cannot "apt-get needs root"
command -v apt-get >/dev/null || cannot "no apt-get: install ${PACKAGES[*]} with your package manager"
DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || cannot "apt-get update failed"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2 \
    || cannot "apt-get install ${PACKAGES[*]} failed"
