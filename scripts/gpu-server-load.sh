#!/usr/bin/env bash
# The server under load on a GPU machine (called by scripts/gpu-check.sh):
# the same model served by the CPU engine and by the CUDA engine, each
# measured with `tickserve bench load` (closed loop, 64 clients, requests
# of one row over HTTP JSON, HTTP binary tensors and gRPC, result cache
# off).
#
# usage: gpu-server-load.sh TICKSERVE_BINARY REPO_ROOT [SECONDS]
set -u -o pipefail
bin="$1"
root="$2"
seconds="${3:-8}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
port=18000
# GET a URL, printing the body; fails on an HTTP error (no curl needed).
get() {
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"
}
for engine in auto native cuda; do
    repo="$work/$engine"
    mkdir -p "$repo/cnn_lstm/1"
    cp "$root/models/cnn_lstm/1/model.onnx" "$repo/cnn_lstm/1/"
    cfg="$repo/cnn_lstm/config.toml"
    # A config of its own, so a checkout newer than the binary cannot break it.
    if [ "$engine" = cuda ]; then
        batch=256 instances=2
    else
        # The CPU baseline: one engine instance per two of the machine's cores.
        batch=32 instances=$(( $(nproc) / 2 ))
    fi
    cat >"$cfg" <<CONFIG
engine = "$engine"
max_batch_size = $batch
instances = $instances
[[input]]
name = "input"
datatype = "FP32"
dims = [50, 60]
[[output]]
name = "output"
datatype = "FP32"
dims = [3]
CONFIG
    echo "--- $engine: $(grep -E '^(engine|max_batch_size|instances|threads) =' "$cfg" | tr '\n' ' ')"
    "$bin" serve --model-repository "$repo" --http-addr "127.0.0.1:$port" \
        --grpc-addr "127.0.0.1:$((port + 1))" --metrics-addr "127.0.0.1:$((port + 2))" \
        --cache false --log-level info >"$work/$engine.log" 2>&1 &
    server=$!
    ready=0
    for _ in $(seq 1 120); do
        if get "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; then ready=1; break; fi
        kill -0 "$server" 2>/dev/null || break
        sleep 0.5
    done
    if [ "$ready" = 1 ] && [ "$engine" = auto ]; then
        echo "engine = \"auto\" chose: $(get "http://127.0.0.1:$port/v2/models/cnn_lstm")"
    elif [ "$ready" = 1 ]; then
        get "http://127.0.0.1:$port/v2/models/cnn_lstm"; echo
        # Every wire format the server speaks: JSON, Triton's binary
        # tensors, gRPC (the last two keep decoding off the critical path).
        for protocol in http-json http-binary grpc; do
            echo "--- $engine over $protocol"
            "$bin" bench load -q --url "http://127.0.0.1:$port" --grpc-url "http://127.0.0.1:$((port + 1))" \
                --protocol "$protocol" -m cnn_lstm -c 64 -d "${seconds}s" 2>&1 | grep -E "^  all|err %|Results"
        done
    else
        echo "$engine server did not become ready"
    fi
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    grep -iE 'cuda|engine auto|error|warn' "$work/$engine.log" | head -10
    port=$((port + 10))
done
