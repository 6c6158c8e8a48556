#!/usr/bin/env bash
# Server throughput and latency on the bundled model, closed loop, with
# wrk (Debian package `wrk`) against a release build on loopback:
# 1 client, then 64 clients, DURATION seconds each (default 10).
#
#   scripts/bench-server.sh [DURATION]
#
# Numbers depend on the machine and on what else runs on it: compare runs
# made back to back, not across machines.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
command -v wrk >/dev/null || { echo "install wrk: apt-get install -y wrk" >&2; exit 1; }

cargo build --release --locked -q
port=18000
./target/release/tickserve serve --http-addr "127.0.0.1:$port" --metrics-addr 127.0.0.1:18002 \
    --log-level warn &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
    sleep 0.1
done
url="http://127.0.0.1:$port/v2/models/cnn_lstm/infer"
echo "== warm-up"; wrk -t1 -c8 -d2s -s bench/post_golden.lua "$url" >/dev/null
for clients in 1 64; do
    threads=$(( clients < 2 ? 1 : 2 ))
    echo "== $clients client(s), ${duration}s"
    wrk -t"$threads" -c"$clients" -d"${duration}s" --latency -s bench/post_golden.lua "$url" \
        | grep -E "Requests/sec|^ +(50|75|90|99)%|Non-2xx|Socket errors"
done
echo "== batch sizes (Prometheus)"
curl -s http://127.0.0.1:18002/metrics | grep -E '^batch_processing_batch_size_(sum|count)'
