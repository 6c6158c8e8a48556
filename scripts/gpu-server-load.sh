#!/usr/bin/env bash
# The server under load on a GPU machine (called by scripts/gpu-check.sh):
# the same model served by the CPU engine and by the CUDA engine, each
# measured with `tickserve bench load` (closed loop, 64 clients, HTTP JSON
# requests of one row, result cache off).
#
# usage: gpu-server-load.sh TICKSERVE_BINARY REPO_ROOT [SECONDS]
set -u -o pipefail
bin="$1"
root="$2"
seconds="${3:-8}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
port=18000
for engine in native cuda; do
    repo="$work/$engine"
    mkdir -p "$repo"
    cp -r "$root/models/cnn_lstm" "$repo/"
    cfg="$repo/cnn_lstm/config.toml"
    sed -i "s/^engine = .*/engine = \"$engine\"/" "$cfg"
    if [ "$engine" = cuda ]; then
        sed -i 's/^max_batch_size = .*/max_batch_size = 256/; s/^instances = .*/instances = 2/' "$cfg"
    else
        # The CPU baseline with one engine instance per two of the machine's cores.
        sed -i "s/^instances = .*/instances = $(( $(nproc) / 2 ))/" "$cfg"
    fi
    echo "--- $engine: $(grep -E '^(engine|max_batch_size|instances|threads) =' "$cfg" | tr '\n' ' ')"
    "$bin" serve --model-repository "$repo" --http-addr "127.0.0.1:$port" \
        --grpc-addr "127.0.0.1:$((port + 1))" --metrics-addr "127.0.0.1:$((port + 2))" \
        --cache false --log-level warn &
    server=$!
    ready=0
    for _ in $(seq 1 120); do
        if curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; then ready=1; break; fi
        sleep 0.5
    done
    if [ "$ready" = 1 ]; then
        curl -s "http://127.0.0.1:$port/v2/models/cnn_lstm" ; echo
        "$bin" bench load --url "http://127.0.0.1:$port" -m cnn_lstm -c 64 -d "${seconds}s" 2>&1 | tail -25
    else
        echo "$engine server did not become ready"
    fi
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null
    port=$((port + 10))
done
