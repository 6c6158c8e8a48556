#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, and the integration tests that start the real
# server on loopback ports. Needs only the Rust toolchain.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked "$@"
