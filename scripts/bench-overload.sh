#!/usr/bin/env bash
# Real-time overload, measured: starts the bundled model (cache off) on
# loopback, measures its closed-loop priority-1 capacity, then offers
# priority 1 at 3× that rate for 10 s, three seconds into a 16 s flood of
# 256 closed-loop priority-5 clients. Prints one table row: how many
# priority-1 requests were answered, refused with 429 at admission, and
# expired (503) after admission — the goal is 0 expired (docs/scheduling.md,
# "Overload").
#
#   scripts/bench-overload.sh            # one run
#   scripts/bench-overload.sh --hog      # beside two busy loops (a noisy neighbour on 2 cores)
#   TICKSERVE_BIN=path scripts/bench-overload.sh   # another build
#
# Bounded: start-up, 5 s of capacity, 16 s of flood; the busy loops stop by
# themselves after 40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
hog=false
[ "${1:-}" = "--hog" ] && hog=true
bin="${TICKSERVE_BIN:-}"
if [ -z "$bin" ]; then
    cargo build --release -q -p tickserve
    bin=target/release/tickserve
fi
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
# The three ports stay below the ephemeral range (32768 up) that the load
# generator's own connections take theirs from.
port=$((20000 + RANDOM % 3000))
"$bin" serve --cache false --log-level error --http-addr "127.0.0.1:$port" \
    --grpc-addr "127.0.0.1:$((port + 3000))" --metrics-addr "127.0.0.1:$((port + 6000))" &
pids+=($!)
url="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
    curl -sf "$url/v2/health/ready" > /dev/null && break
    sleep 0.1
done
curl -sf "$url/v2/health/ready" > /dev/null || {
    echo "the server on port $port did not become ready (a port in use?); run again" >&2
    exit 1
}
if $hog; then
    for _ in 1 2; do
        timeout 40 sh -c 'while :; do :; done' &
        pids+=($!)
    done
fi
"$bin" bench load --url "$url" --priorities 1:1 -c 8 -d 5s -q --format none \
    --json "$work/capacity.json" || true
rate=$(python3 -c 'import json, sys; print(round(3 * json.load(open(sys.argv[1]))["result"]["overall"]["throughput_rps"]))' "$work/capacity.json")
"$bin" bench load --url "$url" --priorities 5:1 -c 256 -d 16s -q --format none \
    --json "$work/flood.json" > /dev/null 2>&1 &
flood=$!
sleep 3
"$bin" bench rate --url "$url" --priorities 1:1 -r "$rate" -d 10s -q --format none \
    --json "$work/overload.json" || true
wait "$flood" || true
echo "| neighbour | p1 capacity (req/s) | offered (req/s) | answered | 429 at admission | expired (503) | not sent (client cap) |"
echo "|---|---|---|---|---|---|---|"
python3 - "$work/overload.json" "$rate" "$hog" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["result"]["overall"]
rate, hog = int(sys.argv[2]), sys.argv[3] == "true"
by = r["errors_by_reason"]
print(f'| {"two busy loops" if hog else "none"} | {rate / 3:.0f} | {rate} | {r["ok"]} '
      f'| {by.get("http 429", 0)} | {by.get("http 503", 0)} '
      f'| {by.get("in-flight cap exceeded (not sent)", 0)} |')
PY
