#!/usr/bin/env bash
# Real-time isolation, measured: for each scheduling configuration of the
# bundled model (cache off), starts `tickserve serve` on loopback and runs
# `tickserve bench mixed` against it (priority 1 at 100 req/s alone, 256
# closed-loop priority-5 clients alone, then both), and prints one table
# row per configuration. docs/scheduling.md shows its output.
#
#   scripts/bench-mixed.sh [phase-seconds] [config…]
#
# Configurations: today (chunking and the latency targets off, bodies
# decoded on the runtime, the kernel's time slice: the server before
# real-time isolation, 1 instance), bundled (the bundled
# config.toml: a worker for priorities 1–2 pinned to core 0 and one for
# all on core 1), bundled-main (the same, with the priority-1 client on
# the main address instead of the real-time listener), one (1 instance),
# two (2 instances), threads2 (1 instance of 2 threads), bundled-threads2
# (the bundled workers with threads = 2, helpers parked after each call)
# and threads2-today (1 instance of 2 threads before isolation), int8
# (the bundled workers in int8, the general one at nice 10),
# int8-scavenger (the same plus a third worker for all priorities at
# nice 19 on the real-time worker's core, using its spare time) and
# int8-today (int8 before isolation).
# Every configuration but the *today ones and bundled-main sends the
# priority-1 client to the real-time listener (--realtime-http-addr).
# Default: all of them. Bounded: each configuration takes 3 phases plus
# start-up.
set -euo pipefail
cd "$(dirname "$0")/.."

phase=${1:-10}
shift || true
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
    configs=(today bundled bundled-main one two threads2 bundled-threads2 threads2-today int8 int8-scavenger int8-today)
fi

cargo build --release -q -p tickserve
bin=target/release/tickserve
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true' EXIT

unchunked='[dynamic_batching]
chunking = false
[dynamic_batching.priority.1]
target_latency = "0s"
[dynamic_batching.priority.2]
target_latency = "0s"'
reserved='[[instance_group]]
count = 1
priorities = [1, 2]
cores = [0]
[[instance_group]]
count = 1
cores = [1]
nice = 10'
scavenger='
[[instance_group]]
count = 1
cores = [0]
nice = 19'

# Prints the config.toml of configuration $1.
config_of() {
    local top="" extra=""
    case $1 in
        today) top="instances = 1"; extra=$unchunked ;;
        two) top="instances = 2" ;;
        bundled | bundled-main) cat models/cnn_lstm/config.toml; return ;;
        one) top="instances = 1" ;;
        threads2) top="threads = 2" ;;
        bundled-threads2)
            local edited
            edited=$(sed -e 's/^threads = 1$/threads = 2/' -e 's/^helper_spin = .*/helper_spin = "0s"/' \
                models/cnn_lstm/config.toml)
            # A silent no-op would measure the bundled workers under this name.
            if ! grep -q '^threads = 2$' <<< "$edited" || ! grep -q '^helper_spin = "0s"$' <<< "$edited"; then
                echo "bundled-threads2: models/cnn_lstm/config.toml lacks the threads/helper_spin lines it edits" >&2
                exit 2
            fi
            printf '%s\n' "$edited"
            return
            ;;
        threads2-today) top=$'instances = 1\nthreads = 2'; extra=$unchunked ;;
        int8) top='precision = "int8"'; extra=$reserved ;;
        int8-scavenger) top='precision = "int8"'; extra="$reserved$scavenger" ;;
        int8-today) top=$'instances = 1\nprecision = "int8"'; extra=$unchunked ;;
        *) echo "unknown configuration $1" >&2; exit 2 ;;
    esac
    printf 'engine = "native"\nmax_batch_size = 32\n%s\n' "$top"
    printf '[[input]]\nname = "input"\ndatatype = "FP32"\ndims = [50, 60]\n'
    printf '[[output]]\nname = "output"\ndatatype = "FP32"\ndims = [3]\n%s\n' "$extra"
}

echo "| configuration | p1 p50 / p99 alone (ms) | p1 p50 / p99 under flood (ms) | p99 ratio | p1 errors | p5 req/s alone / with p1 | p5 share | verdict |"
echo "|---|---|---|---|---|---|---|---|"
for name in "${configs[@]}"; do
    repo=$work/$name
    mkdir -p "$repo/cnn_lstm/1"
    cp models/cnn_lstm/1/model.onnx "$repo/cnn_lstm/1/"
    config_of "$name" > "$repo/cnn_lstm/config.toml"
    # All four ports stay below the ephemeral range (32768 up) that the
    # load generator's own connections take theirs from.
    port=$((20000 + RANDOM % 3000))
    before=()
    fg_url=http://127.0.0.1:$port
    case $name in
        *today) before=(--background-decode-threads 0 --request-slice 0s) ;;
        bundled-main) ;;
        *)
            before=(--realtime-http-addr "127.0.0.1:$((port + 9000))")
            fg_url=http://127.0.0.1:$((port + 9000))
            ;;
    esac
    "$bin" serve --model-repository "$repo" --http-addr "127.0.0.1:$port" \
        --grpc-addr "127.0.0.1:$((port + 3000))" --metrics-addr "127.0.0.1:$((port + 6000))" \
        --cache false --log-level warn "${before[@]}" > "$work/$name.log" 2>&1 &
    server=$!
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null && break
        sleep 0.1
    done
    if ! curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null; then
        echo "$name: the server did not become ready; its log:" >&2
        cat "$work/$name.log" >&2
        exit 1
    fi
    "$bin" bench mixed --url "http://127.0.0.1:$port" --fg-url "$fg_url" --phase "${phase}s" -q --format none \
        --json "$work/$name.json" || true
    kill "$server"; wait "$server" 2>/dev/null || true
    server=
    python3 - "$name" "$work/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1:3]
r = json.load(open(path))
m = r["mixed"]
alone_fg, alone_bg, both = m["phases"]
fa, ff = alone_fg["foreground"]["stats"], both["foreground"]["stats"]
ba, bf = alone_bg["background"]["stats"], both["background"]["stats"]
s = m["summary"]
ratio = lambda v, f: "n/a" if v is None else f(v)
lat = lambda o: f'{o["latency_ms"]["median"]:.2f} / {o["latency_ms"]["p99"]:.2f}'
verdict = "met" if r["compliance"]["compliant"] else "missed: " + ", ".join(
    c["metric"] for c in r["compliance"]["checks"] if not c["passed"])
print(f'| {name} | {lat(fa)} | {lat(ff)} | {ratio(s["fg_p99_ratio"], lambda v: f"{v:.1f}×")} '
      f'| {ff["errors"] + fa["errors"]} '
      f'| {ba["throughput_rps"]:.0f} / {bf["throughput_rps"]:.0f} '
      f'| {ratio(s["bg_throughput_ratio"], lambda v: f"{v * 100:.0f} %")} | {verdict} |')
PY
done
