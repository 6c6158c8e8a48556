#!/usr/bin/env bash
# Runs every test of the project: unit tests, the engine's golden tests
# against PyTorch fixtures, the ONNX Runtime equivalence tests, the
# integration tests that start the real server on loopback ports, the
# dashboard test in headless Chromium, the checks of the deployment files
# (Kubernetes manifests, Prometheus alert rules), Triton's own clients
# against a running tickserve: tritonclient (Python, HTTP and gRPC) and
# perf_analyzer, and the local multi-replica test: three tickserve
# processes behind nginx sharing one Redis, with SIGTERM and SIGKILL
# under load, and streams routed by sequence id (deploy/local/run.sh test,
# about a minute and a half), and the short fault-injection run
# (scripts/chaos.sh ci: Redis killed, SIGTERM, SIGKILL, about a minute).
# The fuzz corpus is replayed by `cargo test`
# (crates/server/tests/fuzz_corpus.rs).
#
#   scripts/test.sh                          # everything
#   scripts/test.sh -p tickserve-scheduler   # extra args go to cargo test (Rust tests only)
#
# Needs the Rust toolchain and python3. It installs what the tests need
# when it is missing: Debian's `chromium`, `prometheus` (promtool),
# `redis-server` (the cache tests start their own on a free loopback port),
# `nginx` and `curl` (the multi-replica test) when run as root; ONNX Runtime's library from PyPI into
# target/venv-onnxruntime (as root, Debian's python3-venv if needed);
# kubernetes-validate and yamllint into target/venv-deploy; the Triton
# client venvs under ~/.cache/tickserve (perf_analyzer also apt-installs
# libb64-0d).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
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

echo "== ONNX Runtime for the engine equivalence tests"
eval "$(scripts/onnxruntime-env.sh)"
export ORT_DYLIB_PATH
# With the library installed, the ONNX Runtime tests must run, not skip.
export TICKSERVE_REQUIRE_ORT=1
echo "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"

echo "== deployment manifests"
scripts/validate-deploy.sh

echo "== promtool check rules"
promtool check rules deploy/prometheus/*.yml

echo "== cargo test"
cargo test --workspace --locked "$@"

if [[ $# -eq 0 ]]; then
    echo "== Triton clients"
    scripts/python_client_check.sh
    scripts/perf_analyzer_check.sh
    echo "== three replicas behind nginx, one Redis (deploy/local)"
    deploy/local/run.sh test
    echo "== fault injection, short run: no accepted request lost (scripts/chaos.sh ci)"
    scripts/chaos.sh ci
fi
