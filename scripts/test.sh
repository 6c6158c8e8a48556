#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, the ONNX Runtime equivalence tests, and the
# integration tests that start the real server on loopback ports.
#
#   scripts/test.sh                          # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test
#
# It installs what the tests need when it is missing: ONNX Runtime's
# library from PyPI into target/venv-onnxruntime (python3 with venv;
# as root it installs Debian's python3-venv if needed), and
# kubernetes-validate + yamllint into target/venv-deploy.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ONNX Runtime for the engine equivalence tests"
eval "$(scripts/onnxruntime-env.sh)"
export ORT_DYLIB_PATH
# With the library installed, the ONNX Runtime tests must run, not skip.
export TICKSERVE_REQUIRE_ORT=1
echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"

echo "== deployment manifests"
scripts/validate-deploy.sh

echo "== cargo test"
cargo test --workspace --locked "$@"
