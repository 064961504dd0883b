#!/usr/bin/env bash
# Set up everything Valv needs on a fresh machine, then run it: central on
# 127.0.0.1:50051 and a sidecar on 127.0.0.1:50052 (and valv-data/sidecar.sock)
# that answers Encrypt/Decrypt from cached keys and forwards the rest.
#
#   ./run.sh                 central + sidecar, embedded store in ./valv-data
#   ./run.sh --log-level debug   extra arguments go to `valv central`
#
# VALV_CENTRAL_ADDR / VALV_SIDECAR_ADDR change the two addresses. First start
# creates ./valv-data with a development root key (mode 0600) and warns
# loudly about it. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
# An install with the dev extras (./test.sh, CI) has everything run.sh needs too.
installed=.venv/.valv-installed
[[ -f .venv/.valv-dev-installed ]] && [[ ! pyproject.toml -nt .venv/.valv-dev-installed ]] \
  && installed=.venv/.valv-dev-installed
if [[ ! -f "$installed" ]] || [[ pyproject.toml -nt "$installed" ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
  touch .venv/.valv-installed
fi

export VALV_DATA_DIR="${VALV_DATA_DIR:-$PWD/valv-data}"
central_addr="${VALV_CENTRAL_ADDR:-127.0.0.1:50051}"
sidecar_addr="${VALV_SIDECAR_ADDR:-127.0.0.1:50052}"
mkdir -p "$VALV_DATA_DIR"
ready="$VALV_DATA_DIR/central.ready"
rm -f "$ready"
# Both commands read VALV_ADDR; give each its address explicitly instead.
unset VALV_ADDR

.venv/bin/valv central --addr "$central_addr" --ready-file "$ready" "$@" &
central=$!
sidecar=""
stop() {
  [[ -n "$sidecar" ]] && kill -TERM "$sidecar" 2>/dev/null || true
  kill -TERM "$central" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

for _ in $(seq 600); do  # up to 60 s for central to be ready
  [[ -f "$ready" ]] && break
  kill -0 "$central" 2>/dev/null || { echo "run.sh: central exited" >&2; exit 1; }
  sleep 0.1
done
[[ -f "$ready" ]] || { echo "run.sh: central did not start in 60 s" >&2; exit 1; }

sidecar_ready="$VALV_DATA_DIR/sidecar.ready"
sidecar_socket="$VALV_DATA_DIR/sidecar.sock"
rm -f "$sidecar_ready"
.venv/bin/valv sidecar --central "$central_addr" --addr "$sidecar_addr" \
  --unix-socket "$sidecar_socket" --ready-file "$sidecar_ready" &
sidecar=$!
for _ in $(seq 300); do  # up to 30 s for the sidecar to be ready
  [[ -f "$sidecar_ready" ]] && break
  kill -0 "$sidecar" 2>/dev/null || { echo "run.sh: the sidecar exited" >&2; exit 1; }
  sleep 0.1
done
[[ -f "$sidecar_ready" ]] || { echo "run.sh: the sidecar did not start in 30 s" >&2; exit 1; }
cat >&2 <<EOF

Valv is running (Ctrl-C stops both):
  central  $central_addr    the whole Cloud KMS v1 API; create keys, set IAM here
  sidecar  $sidecar_addr    same API; Encrypt/Decrypt answered from cached keys
           unix:$sidecar_socket
Try it:
  .venv/bin/python examples/quickstart.py --central $central_addr --sidecar $sidecar_addr
or point Google's client at either address (README, "Quick start").

EOF
wait -n "$central" "$sidecar"
