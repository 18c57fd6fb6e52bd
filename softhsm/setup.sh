#!/usr/bin/env bash
# Installs what grant-agent needs to build, run on a development SoftHSM token, and test,
# on Debian or Ubuntu: SoftHSM2 (the token), OpenSC's pkcs11-tool (tests read the token
# with it), OpenSSL (the demo verifies a grant with it) and a C linker. Idempotent.
set -euo pipefail

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || [ -e "/usr/lib/$(uname -m)-linux-gnu/softhsm/libsofthsm2.so" ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v openssl >/dev/null || need+=(openssl)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v curl >/dev/null || need+=(ca-certificates)

if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing. grant-agent needs Rust 1.88 or newer: install it from https://rustup.rs and run this again." >&2
  exit 1
fi
rust=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.88.0\n' "$rust" | sort -V | head -n1)" != "1.88.0" ]; then
  echo "setup: Rust $rust is too old; grant-agent needs 1.88 or newer (rustup update)." >&2
  exit 1
fi
