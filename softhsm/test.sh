#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: against real SoftHSM2 tokens, each
# made fresh in a temp dir, and against opencryptoki's soft token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/setup.sh
# A second PKCS#11 implementation (opencryptoki's soft token) for tests/opencryptoki.rs.
bash softhsm/opencryptoki.sh
# The fault-injecting PKCS#11 module (fault-pkcs11/) that tests/fault.rs loads by path.
cargo build --locked -p fault-pkcs11
# The local Maskinporten (mock-maskinporten/), which tests/common starts from beside the
# agent's binary: a test cannot name another package's binary with CARGO_BIN_EXE_*.
cargo build --locked -p mock-maskinporten
cargo test --locked --workspace "$@"
