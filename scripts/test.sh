#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, and the integration tests that start the real
# server on loopback ports; then Triton's own clients against a running
# tickserve: tritonclient (Python, HTTP and gRPC) and perf_analyzer. Those
# two create their Python venvs under ~/.cache/tickserve on the first run
# (network access to PyPI; perf_analyzer also apt-installs libb64-0d).
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test (Rust tests only)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked "$@"
if [[ $# -eq 0 ]]; then
    scripts/python_client_check.sh
    scripts/perf_analyzer_check.sh
fi
