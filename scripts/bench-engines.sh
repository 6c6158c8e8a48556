#!/usr/bin/env bash
# Native engine vs ONNX Runtime on the bundled model, in one run (see
# crates/engine-ort/benches/compare.rs). Installs ONNX Runtime from PyPI
# into a venv first. BENCH_SECONDS sets the time per configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/onnxruntime-env.sh)"
export ORT_DYLIB_PATH
cargo bench --locked -p tickserve-engine-ort --bench compare
