#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#
#   ./test.sh                all tests
#   ./test.sh -k encrypt     pytest arguments pass through
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

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
