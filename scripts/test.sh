#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, and the integration tests that start the real
# server on loopback ports; checks the Prometheus alert rules. Needs the
# Rust toolchain, plus Debian's `chromium` (dashboard test) and
# `prometheus` (promtool), which this script installs when missing and run
# as root.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "== installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
fi

echo "== promtool check rules"
promtool check rules deploy/prometheus/*.yml

cargo test --workspace --locked "$@"
