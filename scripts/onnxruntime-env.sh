#!/usr/bin/env bash
# Installs ONNX Runtime's shared library from PyPI into a venv (once) and
# prints the `export ORT_DYLIB_PATH=…` line for it. Source-friendly:
#
#   eval "$(scripts/onnxruntime-env.sh)"
#
# The PyPI wheel `onnxruntime` ships libonnxruntime.so (engines.md); tickserve
# loads it at run time, so nothing is linked at build time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TICKSERVE_ORT_VENV:-target/venv-onnxruntime}"
version="${TICKSERVE_ORT_VERSION:-1.32.0}"

if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        # Debian splits venv support out of python3.
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
            python3 -m venv "$venv" >&2
        else
            echo "cannot create a Python venv: install python3-venv" >&2
            exit 1
        fi
    fi
fi
if ! ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --disable-pip-version-check "onnxruntime==$version" >&2
fi
lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
echo "export ORT_DYLIB_PATH=$(realpath "$lib")"
