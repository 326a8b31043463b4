#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver, for tests/report/test_browser.py.
#   tests/browser.sh install     # root: apt-get install chromium chromium-driver (once per machine)
# Exit status 77 means "cannot install here", with the reason on stderr.
set -euo pipefail
PACKAGES=(chromium chromium-driver)
cannot() { echo "browser: cannot install here: $*" >&2; exit 77; }
[[ ${1:-} == install ]] || { echo "usage: $0 install" >&2; exit 2; }
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "browser: chromium and chromedriver already installed" >&2; exit 0
fi
[[ $(id -u) == 0 ]] || cannot "apt-get needs root"
command -v apt-get >/dev/null || cannot "no apt-get: install ${PACKAGES[*]} with your package manager"
DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || cannot "apt-get update failed"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2 \
    || cannot "apt-get install ${PACKAGES[*]} failed"
