#!/usr/bin/env bash
# Fault injection on loopback with figures: three tickserve replicas behind
# nginx sharing one Redis (the deploy/local set-up), four scenarios under
# load, one table. Fails when any scenario lost an accepted request.
#
#   scripts/chaos.sh          # full run: all four, overload for 60 s, about 2.5 minutes
#   scripts/chaos.sh ci       # short run for CI: scenarios 2-4, about 1 minute
#   scripts/chaos.sh overload # scenario 1 only, 15 s
#
# The CI run leaves the overload out: on a shared CI machine an open loop
# at 3x capacity measures the machine as much as the server, and a few of
# its requests currently end with a broken connection (docs/operations.md).
#
# Scenarios:
#   1. overload: mixed priorities (1:10,3:60,5:30) open loop at 3x the
#      measured capacity of one replica, straight to it: accepted, refused
#      with 429, timed out (503 after the request's timeout), failed,
#      peak RSS of the replica;
#   2. Redis killed (SIGKILL) and restarted mid-load, through nginx;
#   3. SIGTERM to a replica mid-load, load straight to it (no nginx to
#      retry): requests it accepted but did not answer;
#   4. SIGKILL to one of the three replicas mid-load, through nginx.
#
# "Lost" counts requests a client sent on an open connection that got no
# HTTP answer: the connection broke after the request went out, or the
# client's timeout passed. A refused connection (nothing accepted) or
# any HTTP status (429, 503, 500: answered) is not lost; they have their
# own columns. The client timeout is 30 s, above the longest queue timeout
# of the bundled model (10 s for priority 5), so a request the server
# still holds is not counted lost. Lost must be 0 in every scenario.
#
# Needs what deploy/local/run.sh needs: redis-server, redis-cli, nginx,
# curl, python3 and a tickserve binary ($TICKSERVE_BIN, else
# target/debug/tickserve built with cargo). Settings (environment):
# TICKSERVE_CHAOS_CONCURRENCY (8, clients of the steady load).
set -euo pipefail
export LC_ALL=C

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
here=$root/deploy/local
variant=${1:-full}
case "$variant" in
    full) overload_s=60 steady_s=20 scenarios=(overload redis sigterm sigkill) ;;
    ci) overload_s=0 steady_s=12 scenarios=(redis sigterm sigkill) ;;
    overload) overload_s=15 steady_s=0 scenarios=(overload) ;;
    -h | --help | help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [full|ci|overload]" >&2
        exit 2
        ;;
esac

# Settings lib.sh reads. mode=test: the debug binary (dependencies and the
# engine are optimised in it; capacity is measured in the same run).
mode=test
replicas=3
concurrency=${TICKSERVE_CHAOS_CONCURRENCY:-8}
fail_timeout_s=2
drain_timeout=10s
redis_timeout=100ms
model=cnn_lstm
# shellcheck source=deploy/local/lib.sh
source "$here/lib.sh"

# One table row per scenario: name|requests|ok|429|503|other failed|refused connections|lost|notes
rows=()

# Classifies a bench JSON report's outcomes into the table's columns.
classify() {
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["result"]["overall"]
reasons = r.get("errors_by_reason", {})
requests = r["requests"]
def take(pred):
    return sum(v for k, v in reasons.items() if pred(k))
s429 = take(lambda k: k == "http 429")
s503 = take(lambda k: k == "http 503")
other = take(lambda k: k.startswith("http ") and k not in ("http 429", "http 503"))
refused = take(lambda k: k == "transport: connect" or k.startswith("in-flight cap"))
lost = take(lambda k: k == "timeout" or (k.startswith("transport:") and k != "transport: connect"))
ok = requests - sum(reasons.values())
print(requests, ok, s429, s503, other, refused, lost)
PY
}

add_row() {
    local name=$1 report=$2 notes=$3 requests ok s429 s503 other refused lost
    read -r requests ok s429 s503 other refused lost <<<"$(classify "$report")"
    rows+=("$name|$requests|$ok|$s429|$s503|$other|$refused|$lost|$notes")
    echo "  $name: $requests requests: $ok ok, $s429 429, $s503 503, $other other failed, $refused refused connections, $lost lost; $(report "$report" overall.errors_by_reason)"
}

peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"
}

scenario_overload() {
    local url=http://127.0.0.1:${http_port[1]}
    echo "== 1. overload: mixed priorities at 3x the capacity of replica 1 for ${overload_s}s"
    bench "$work/capacity.json" load --url "$url" -c "$concurrency" -d 5s --seed 11 --param cache=false
    local capacity rate
    capacity=$(report "$work/capacity.json" overall.throughput_rps)
    rate=$(calc "int(3 * $capacity)")
    echo "  capacity (closed loop, $concurrency clients, no cache): $capacity requests/s; sending $rate requests/s"
    bench "$work/overload.json" rate --url "$url" -r "$rate" -d "${overload_s}s" --seed 12 \
        --priorities 1:10,3:60,5:30 --param cache=false --max-in-flight 2048 --timeout 30s
    add_row "overload 3x ($rate/s, ${overload_s}s)" "$work/overload.json" \
        "capacity $capacity/s; replica peak RSS $(peak_rss_mib "${pids[replica1]}") MiB"
}

scenario_redis() {
    echo "== 2. Redis killed and restarted under load (through nginx, ${steady_s}s)"
    bench_start "$work/redis.json" load --url "$lb_url" -c "$concurrency" -d "${steady_s}s" \
        --seed 21 --repeat-fraction 0.5 --hot-set 256 --timeout 30s
    sleep 4
    kill -KILL "${pids[redis]}"
    wait_exit redis 5
    sleep 4
    start_redis
    bench_finish
    add_row "Redis SIGKILL + restart" "$work/redis.json" "Redis down 4 s"
}

scenario_sigterm() {
    local victim=2
    echo "== 3. SIGTERM to replica $victim under load straight to it (${steady_s}s)"
    bench_start "$work/sigterm.json" load --url "http://127.0.0.1:${http_port[victim]}" \
        -c "$concurrency" -d "${steady_s}s" --seed 31 --param cache=false --timeout 30s
    sleep 4
    kill -TERM "${pids[replica$victim]}"
    wait_exit "replica$victim" 20
    local status=$exit_status
    bench_finish
    add_row "SIGTERM (direct)" "$work/sigterm.json" "replica exited $status; later connections refused"
    start_replica "$victim"
    wait_replica "$victim"
}

scenario_sigkill() {
    local victim=3
    echo "== 4. SIGKILL to replica $victim of 3 under load (through nginx, ${steady_s}s)"
    bench_start "$work/sigkill.json" load --url "$lb_url" -c "$concurrency" -d "${steady_s}s" \
        --seed 41 --param cache=false --timeout 30s
    sleep 4
    kill -KILL "${pids[replica$victim]}"
    wait_exit "replica$victim" 5
    bench_finish
    add_row "SIGKILL 1 of 3 (nginx)" "$work/sigkill.json" "nginx retries on the others"
    start_replica "$victim"
    wait_replica "$victim"
}

started=$SECONDS
start_all
print_layout
for scenario in "${scenarios[@]}"; do
    "scenario_$scenario"
done

echo
echo "== $((SECONDS - started)) s"
echo "| scenario | requests | ok | 429 | 503 | other failed | refused connections | lost | notes |"
echo "|---|---|---|---|---|---|---|---|---|"
lost_total=0
for row in "${rows[@]}"; do
    IFS='|' read -r name requests ok s429 s503 other refused lost notes <<<"$row"
    echo "| $name | $requests | $ok | $s429 | $s503 | $other | $refused | $lost | $notes |"
    lost_total=$((lost_total + lost))
done
if ((lost_total > 0)); then
    echo "FAIL: $lost_total accepted requests were lost" >&2
    exit 1
fi
echo "ok: no accepted request was lost"
