#!/usr/bin/env bash
# Sets up everything and runs the whole test suite against real SoftHSM2 tokens, each
# made fresh in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/setup.sh
cargo test --locked "$@"
