#!/usr/bin/env bash
# Runs Triton's Python client (tritonclient[http,grpc] from PyPI) against a
# tickserve started for the test (tests/python/triton_clients.py). The venv
# is created once under ~/.cache/tickserve (TICKSERVE_VENV_DIR overrides) so
# repeated runs are fast. Needs python3 with venv and network access to
# PyPI on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TICKSERVE_VENV_DIR:-$HOME/.cache/tickserve}/venv-tritonclient"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import tritonclient.grpc, tritonclient.http, numpy' 2>/dev/null; then
    echo "== creating $venv (tritonclient[http,grpc], numpy)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'tritonclient[http,grpc]' numpy
fi

cargo build -p tickserve --locked --quiet
target="${CARGO_TARGET_DIR:-target}"
"$venv/bin/python" tests/python/triton_clients.py "$target/debug/tickserve"
