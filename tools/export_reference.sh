#!/usr/bin/env bash
# Build the reference ONNX models and golden fixtures for tickserve.
#
# Creates a Python virtual environment at tools/.venv (git-ignored), installs
# torch, onnx, numpy and onnxruntime from PyPI, and runs
# tools/export_reference.py from the repository root. See that script's
# docstring for what it produces.
#
# Usage (from anywhere):   bash tools/export_reference.sh
#   bash tools/export_reference.sh --quantized-only   # only the calibration
#     set and the QDQ fixtures, from the committed models (no retraining)
# Environment:
#   PYTHON          interpreter used to create the venv (default: python3)
#   SKIP_INSTALL=1  reuse an existing tools/.venv without calling pip
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[export_reference] creating venv at $venv"
    "$python" -m venv "$venv"
fi

if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
    echo "[export_reference] installing python dependencies (torch is large)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # Pinned to the versions that produced the committed fixtures (CPU use
    # only; PyPI's Linux torch wheel also pulls the CUDA runtime wheels, ~5 GB).
    "$venv/bin/python" -m pip install --quiet torch==2.15.0 onnx==1.23.2 numpy==2.4.6
    # onnxruntime is only used to cross-check the exported graphs; the
    # script skips that check if it is missing.
    "$venv/bin/python" -m pip install --quiet onnxruntime==1.32.0 \
        || echo "[export_reference] onnxruntime not installed; ORT check will be skipped"
fi

cd "$root"
exec "$venv/bin/python" "$here/export_reference.py" "$@"
