#!/usr/bin/env bash
# The native engine at fp32, bf16, int8 dynamic, int8 static and on the
# committed QDQ model against ONNX Runtime fp32, ONNX Runtime's dynamically
# quantised int8 model and ONNX Runtime on the QDQ model, in one run, with
# the error table of each on the golden windows first (see
# crates/engine-ort/benches/precision.rs). Installs ONNX Runtime (and the
# `onnx` package its quantiser needs) into the venv of
# scripts/onnxruntime-env.sh and writes the int8 model under target/
# (not committed). BENCH_SECONDS sets the time per configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/onnxruntime-env.sh)"
export ORT_DYLIB_PATH
venv="${TICKSERVE_ORT_VENV:-target/venv-onnxruntime}"
if ! "$venv/bin/python" -c "import onnx" 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check onnx >&2
fi
int8="target/bench-precision/model.int8.onnx"
mkdir -p "$(dirname "$int8")"
"$venv/bin/python" - "$int8" <<'PY'
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic("models/cnn_lstm/1/model.onnx", sys.argv[1], weight_type=QuantType.QInt8)
PY
export TICKSERVE_ORT_INT8_MODEL="$PWD/$int8"
cargo bench --locked -p tickserve-engine-ort --bench precision
