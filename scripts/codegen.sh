#!/usr/bin/env bash
# Regenerate the wire schema and the Python code generated from it:
#   proto/google/cloud/kms/v1/*.proto   emitted by scripts/gen_kms_proto.py
#   valv/_proto/                        betterproto2 code for KMS, valv.*,
#                                       google.cloud.location and google.iam.v1
#
# Usage: scripts/codegen.sh          regenerate in place
#        scripts/codegen.sh --check  regenerate into a temp dir and fail if the
#                                    committed files differ (used by CI)
#
# PYTHON selects the interpreter (default: the active virtualenv's, else
# python3); it must have the "dev" extras installed.
set -euo pipefail

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"; else PYTHON=python3; fi
fi
# The plugin runs from a temp dir (see below), so a relative path would break.
if [[ "$PYTHON" == */* ]]; then
  PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
fi
# protoc finds the plugin (protoc-gen-python_betterproto2) and the plugin finds
# ruff on PATH; both live next to the interpreter.
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH

site="$("$PYTHON" -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')"
wkt="$("$PYTHON" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/proto" "$tmp/out" "$tmp/cwd"

"$PYTHON" "$repo/scripts/gen_kms_proto.py" "$tmp/proto"

# Inputs as import-relative names, so each resolves through the include path
# (the freshly emitted KMS files shadow the committed ones).
inputs=()
for f in "$tmp"/proto/google/cloud/kms/v1/*.proto; do
  inputs+=("${f#"$tmp/proto/"}")
done
while IFS= read -r f; do
  inputs+=("${f#"$repo/proto/"}")
done < <(find "$repo/proto/valv" -name '*.proto' | LC_ALL=C sort)
# Mixins, compiled from the copies shipped in site-packages (never vendored).
inputs+=(
  google/cloud/location/locations.proto
  google/iam/v1/iam_policy.proto
  google/iam/v1/policy.proto
  google/iam/v1/options.proto
)

# Run the plugin from an empty directory: it skips __init__.py files that exist
# relative to its cwd, and it formats with ruff, which reads config from cwd.
# A fixed ruff.toml keeps the output independent of where this is run.
printf 'line-length = 100\ntarget-version = "py311"\n' >"$tmp/cwd/ruff.toml"
(
  cd "$tmp/cwd"
  "$PYTHON" -m grpc_tools.protoc \
    -I "$tmp/proto" -I "$repo/proto" -I "$wkt" -I "$site" \
    --python_betterproto2_out="server_generation=async,client_generation=async:$tmp/out" \
    "${inputs[@]}" 2>"$tmp/protoc.log"
) || { cat "$tmp/protoc.log" >&2; exit 1; }

if [[ $check -eq 1 ]]; then
  status=0
  diff -rq -x __pycache__ "$tmp/proto/google" "$repo/proto/google" >"$tmp/diff-proto" || status=1
  diff -rq -x __pycache__ "$tmp/out" "$repo/valv/_proto" >"$tmp/diff-py" || status=1
  if [[ $status -ne 0 ]]; then
    echo "codegen --check: generated files are out of date; run scripts/codegen.sh" >&2
    sed -e "s#$tmp/proto/google#<generated>/proto/google#g" -e "s#$tmp/out#<generated>/valv/_proto#g" \
      -e "s#$repo/##g" "$tmp/diff-proto" "$tmp/diff-py" >&2
    exit 1
  fi
  echo "codegen --check: up to date"
  exit 0
fi

rm -rf "$repo/proto/google" "$repo/valv/_proto"
cp -R "$tmp/proto/google" "$repo/proto/google"
cp -R "$tmp/out" "$repo/valv/_proto"
echo "codegen: wrote proto/google and valv/_proto"
