#!/usr/bin/env bash
# Fuzzes the HTTP/JSON API against docs/openapi.yaml with schemathesis: thousands of
# requests generated from the document, valid and invalid, each answer checked against
# it (documented status, body schema, headers, content type; a request the schema refuses
# must be refused; no 5xx). tests/openapi.rs checks chosen cases on every test run; this
# finds the ones nobody thought of. Not part of CI: it installs schemathesis from PyPI.
#
# It runs `grant-agent dev` (plain TCP on loopback, one rule that allows anything) and
# fuzzes POST /api/v1/grant only: the token operation would post grants to Maskinporten's
# test environment. One check is left out, on purpose:
# - positive_data_acceptance: the agent refuses some schema-valid requests by design
#   (a repeated scope, check digits of consumer_org and pid, an unknown key or
#   environment), each with a documented 4xx.
#
#   OPENAPI_FUZZ_EXAMPLES  examples per phase (default 500)
#   OPENAPI_FUZZ_VENV      where schemathesis is installed (default target/openapi-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/setup.sh
command -v python3 >/dev/null || { echo "openapi-fuzz: python3 is required" >&2; exit 1; }
cargo build --locked --quiet --bin grant-agent
bin=target/debug/grant-agent
venv=${OPENAPI_FUZZ_VENV:-target/openapi-fuzz}
if [ ! -x "$venv/bin/st" ]; then
  # Debian's python3 keeps venv's pip bootstrap in a package of its own.
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis>=4,<5"
fi

work=$(mktemp -d)
agent=""
cleanup() {
  [ -z "$agent" ] || kill "$agent" 2>/dev/null || true
  [ -z "$agent" ] || wait "$agent" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" dev --listen 127.0.0.1:0 --state-dir "$work/state" >"$work/out" 2>"$work/log" &
agent=$!
addr=""
for _ in $(seq 1 600); do
  addr=$(sed -n 's/^grant-agent dev: listening on //p' "$work/out")
  [ -n "$addr" ] && break
  kill -0 "$agent" 2>/dev/null || { cat "$work/log" >&2; echo "openapi-fuzz: the agent did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/log" >&2; echo "openapi-fuzz: the agent did not start within 60 s" >&2; exit 1; }

# From the temp folder, so that schemathesis's example database (.schemathesis/) goes with it.
spec=$(pwd)/docs/openapi.yaml
st=$(realpath "$venv/bin/st")
cd "$work"
"$st" run "$spec" \
  --url "http://$addr" \
  --include-path /api/v1/grant \
  --max-examples "${OPENAPI_FUZZ_EXAMPLES:-500}" \
  --phases examples,coverage,fuzzing \
  --checks all \
  --exclude-checks positive_data_acceptance
