#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#
#   ./test.sh                all tests
#   ./test.sh -k encrypt     pytest arguments pass through
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# SoftHSM2 (Debian package) provides the PKCS#11 token the root-key tests
# use; without it those tests are skipped with a reason.
if ! command -v softhsm2-util >/dev/null && command -v apt-get >/dev/null \
    && [[ "$(id -u)" == 0 ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null \
    || echo "test.sh: could not install softhsm2; PKCS#11 tests will be skipped" >&2
fi

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
if [[ ! -f .venv/.valv-dev-installed ]] || [[ pyproject.toml -nt .venv/.valv-dev-installed ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  touch .venv/.valv-dev-installed
fi

exec .venv/bin/python -m pytest "$@"
