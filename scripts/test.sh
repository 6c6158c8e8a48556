#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, and the integration tests that start the real
# server on loopback ports. Needs the Rust toolchain and redis-server (the
# cache tests start their own on a free loopback port; Debian package
# redis-server, installed here when missing and run as root).
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing redis-server (needed by the cache tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "warning: redis-server is not installed; the cache tests will fail." >&2
        echo "         Install it with: sudo apt-get install -y redis-server" >&2
    fi
fi

cargo test --workspace --locked "$@"
