#!/usr/bin/env bash
# Sets up everything, runs the agent on a development SoftHSM token, signs a sample grant
# through gRPC and verifies it with OpenSSL against the certificate in its x5c header.
# Interactive: the agent keeps running until Ctrl-C. Without a terminal (CI): it stops.
#
#   GRANT_AGENT_LISTEN  address to serve on (default 127.0.0.1:50051; port 0 picks one)
#   GRANT_AGENT_DEV_DIR token, PIN and config folder (default .dev, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/setup.sh
cargo build --release --locked --quiet
bin=target/release/grant-agent
state=${GRANT_AGENT_DEV_DIR:-.dev}
listen=${GRANT_AGENT_LISTEN:-127.0.0.1:50051}
work=$(mktemp -d)
agent=""
cleanup() {
  [ -z "$agent" ] || kill "$agent" 2>/dev/null || true
  [ -z "$agent" ] || wait "$agent" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" dev --listen "$listen" --state-dir "$state" >"$work/out" 2>"$work/log" &
agent=$!
addr=""
for _ in $(seq 1 600); do
  addr=$(sed -n 's/^grant-agent dev: listening on //p' "$work/out")
  [ -n "$addr" ] && break
  kill -0 "$agent" 2>/dev/null || { cat "$work/log" >&2; echo "demo: the agent did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/log" >&2; echo "demo: the agent did not start within 60 s" >&2; exit 1; }
cat "$work/out"

jws=$("$bin" client grant --addr "$addr" --client-id demo-client --scope test:demo --env test)

b64url() { local s=${1//-/+}; s=${s//_//}; while [ $(( ${#s} % 4 )) -ne 0 ]; do s="$s="; done; printf '%s' "$s" | base64 -d; }
header=$(b64url "${jws%%.*}")
claims=$(b64url "$(printf '%s' "$jws" | cut -d. -f2)")
printf '%s' "$header" | sed -E 's/.*"x5c":\["([^"]+)".*/\1/' | base64 -d >"$work/leaf.der"
openssl x509 -inform der -in "$work/leaf.der" -pubkey -noout >"$work/public.pem"
printf '%s' "${jws%.*}" >"$work/input"
b64url "${jws##*.}" >"$work/signature"
verified=$(openssl dgst -sha256 -verify "$work/public.pem" -signature "$work/signature" "$work/input")

echo
echo "Signed a sample grant through gRPC (the key never left the token):"
echo "  header: $(printf '%s' "$header" | sed -E 's/"x5c":\["([^"]{24})[^"]*"\]/"x5c":["\1..."]/')"
echo "  claims: $claims"
echo "  openssl against the x5c certificate: $verified"
echo "  certificate: $(openssl x509 -inform der -in "$work/leaf.der" -noout -subject -nameopt RFC2253)"
echo "  assertion: ${jws:0:40}... (${#jws} bytes)"

if [ -t 0 ]; then
  echo
  echo "The agent is running on $addr. Press Ctrl-C to stop it."
  # Background jobs of a script ignore SIGINT, so Ctrl-C reaches only this shell; the
  # EXIT trap then stops the agent with SIGTERM, which it handles gracefully.
  trap 'echo; echo "demo: stopping the agent"; exit 0' INT
  wait "$agent" || true
fi
