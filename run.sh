#!/usr/bin/env bash
# Set up everything Valv needs on a fresh machine, then run it.
#
#   ./run.sh                 central on 127.0.0.1:50051 with the embedded store
#   ./run.sh --addr ...      any `valv central` flag is passed through
#
# First start creates ./valv-data with a development root key (mode 0600)
# and warns loudly about it. The sidecar arrives with its own issue; until
# then this runs central alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
if [[ ! -f .venv/.valv-installed ]] || [[ pyproject.toml -nt .venv/.valv-installed ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
  touch .venv/.valv-installed
fi

export VALV_DATA_DIR="${VALV_DATA_DIR:-$PWD/valv-data}"
export VALV_ADDR="${VALV_ADDR:-127.0.0.1:50051}"
exec .venv/bin/valv central "$@"
