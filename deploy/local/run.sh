#!/usr/bin/env bash
# Three tickserve replicas behind nginx, sharing one Redis, on loopback:
# the local version of deploy/kubernetes, as a demo, a test and a
# measurement.
#
#   deploy/local/run.sh test      # CI: assert cache sharing and failover (about 1 minute)
#   deploy/local/run.sh demo [S]  # start everything, print the URLs, stop after S seconds (600) or Ctrl-C
#   deploy/local/run.sh measure   # requests/s through nginx with 1, 2 and 3 replicas
#
# On a machine shared with other work, `sudo nice -n -10 deploy/local/run.sh
# measure` keeps the other processes from taking the cores mid-run.
#
# Every process listens on 127.0.0.1, on ports picked free below the
# kernel's ephemeral range, and lives in a temporary directory that is
# removed at exit. The script stops everything it started when it exits,
# fails or is interrupted.
#
# `test` drives a steady closed-loop load (`tickserve bench load`) through
# nginx and checks, printing every count it asserts:
#   1. cache sharing: answers computed on replica 1 are Redis (L2) hits on
#      replicas 2 and 3, with no engine call there; then the cross-replica
#      hit rate under load on a repeated-input workload;
#   2. SIGTERM to a replica under load loses zero requests (the replica
#      drains and exits 0; nginx retries what it refuses);
#   3. SIGKILL to a replica under load loses at most the requests in
#      flight (at most the client concurrency), nginx stops sending to it,
#      the other replicas keep serving, and once restarted it serves again;
#   4. streams routed by sequence id: `tickserve bench streams` through
#      nginx (x-sequence-id header) gets every tick answered (and, as a
#      control, without the header ticks reach the wrong replica and are
#      refused), each replica holds a share of the streams, and together exactly one
#      window per instrument.
#
# Needs: redis-server and redis-cli, nginx, curl, python3 (reads the
# bench's JSON report and picks ports), and a tickserve binary:
# $TICKSERVE_BIN, else target/debug/tickserve (test, demo) or
# target/release/tickserve (measure), built with cargo when missing.
#
# Settings (environment): TICKSERVE_LOCAL_CONCURRENCY (8, clients of the
# test load), TICKSERVE_LOCAL_MEASURE_DURATION (15s, per measured run),
# TICKSERVE_LOCAL_MEASURE_CONCURRENCY (32), TICKSERVE_LOCAL_KEEP=1 keeps
# the temporary directory (logs, nginx access log) for inspection.
set -euo pipefail
# Decimal points in $EPOCHREALTIME and awk, whatever the locale.
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mode=${1:-test}

replicas=3
concurrency=${TICKSERVE_LOCAL_CONCURRENCY:-8}
# How long nginx keeps a failed replica out (max_fails=1).
fail_timeout_s=2
drain_timeout=10s
# Redis lookups must answer within this or count as misses. The default
# (5ms) suits a pod with its own cores; here six processes share two
# cores, and a scheduling hiccup would open the circuit breaker.
redis_timeout=100ms
model=cnn_lstm

case "$mode" in
    test | demo | measure) ;;
    -h | --help | help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [test|demo [SECONDS]|measure]" >&2
        exit 2
        ;;
esac

# The binary, processes, ports, Redis, replicas, nginx and the bench
# helpers.
# shellcheck source=deploy/local/lib.sh
source "$here/lib.sh"

# === test ===

# Cache sharing, part 1: the same requests to replica 1, then 2, then 3,
# each directly. Replica 1 computes; 2 and 3 must answer every row from
# Redis without running their engine.
test_cache_direct() {
    echo "== 1a. answers computed on replica 1 are Redis hits on replicas 2 and 3"
    local args=(-n 64 --repeat-fraction 1 --hot-set 16 --seed 101)
    bench "$work/direct1.json" latency --url "http://127.0.0.1:${http_port[1]}" "${args[@]}"
    local computed
    computed=$(metric 1 batch_processing_cache_misses_total 'tier="l2"')
    # The writes to Redis happen behind the responses: wait for them.
    local deadline=$((SECONDS + 10)) keys=0
    while keys=$(redis-cli -p "$redis_port" -n 1 dbsize) && ((keys < computed)); do
        ((SECONDS < deadline)) || break
        sleep 0.1
    done
    echo "  replica 1 computed $computed distinct inputs; Redis holds $keys keys"
    check "replica 1 computed the hot set (16 inputs, drawn 64 times): $computed > 0" \
        test "$computed" -gt 0
    local i l1_misses l2_hits l2_misses batches
    for i in 2 3; do
        bench "$work/direct$i.json" latency --url "http://127.0.0.1:${http_port[i]}" "${args[@]}"
        l1_misses=$(metric "$i" batch_processing_cache_misses_total 'tier="l1"')
        l2_hits=$(metric "$i" batch_processing_cache_hits_total 'tier="l2"')
        l2_misses=$(metric "$i" batch_processing_cache_misses_total 'tier="l2"')
        batches=$(metric "$i" tickserve_batches_total)
        echo "  replica $i: in-process misses $l1_misses, Redis hits $l2_hits, Redis misses $l2_misses, engine batches $batches, errors $(report "$work/direct$i.json" overall.errors)"
        check "replica $i: every row it lacked came from Redis ($l2_hits of $computed)" \
            test "$l2_hits" -eq "$computed" -a "$l1_misses" -eq "$computed"
        check "replica $i: no Redis miss ($l2_misses) and no engine batch ($batches)" \
            test "$l2_misses" -eq 0 -a "$batches" -eq 0
    done
}

# Cache sharing, part 2: a repeated-input workload through nginx. Each
# replica meets each hot input once in its own memory; only the first
# replica to meet it should compute it, so the share of in-process misses
# that Redis answers tends to (replicas − 1) / replicas.
test_cache_under_load() {
    echo "== 1b. cross-replica hit rate under load (100 % repeated inputs, hot set 256, through nginx)"
    local i before_hits=() before_misses=()
    for ((i = 1; i <= replicas; i++)); do
        before_hits[i]=$(metric "$i" batch_processing_cache_hits_total 'tier="l2"')
        before_misses[i]=$(metric "$i" batch_processing_cache_misses_total 'tier="l2"')
    done
    bench "$work/shared.json" load --url "$lb_url" -c "$concurrency" -d 8s \
        --repeat-fraction 1 --hot-set 256 --seed 202
    local hits=0 misses=0 h m
    for ((i = 1; i <= replicas; i++)); do
        h=$(($(metric "$i" batch_processing_cache_hits_total 'tier="l2"') - before_hits[i]))
        m=$(($(metric "$i" batch_processing_cache_misses_total 'tier="l2"') - before_misses[i]))
        echo "  replica $i: Redis hits $h, Redis misses (computed here) $m"
        hits=$((hits + h))
        misses=$((misses + m))
    done
    local rate ideal
    rate=$(calc "($hits + $misses) > 0 ? $hits / ($hits + $misses) : 0")
    ideal=$(calc "($replicas - 1) / $replicas")
    echo "  $(report "$work/shared.json" overall.requests) requests, $(report "$work/shared.json" overall.throughput_rps) requests/s, errors $(report "$work/shared.json" overall.errors)"
    echo "  cross-replica hit rate: $hits of $((hits + misses)) in-process misses answered by Redis = $(percent "$rate") % (ideal $(percent "$ideal") %)"
    check "cross-replica hit rate $(percent "$rate") % >= 50 %" is_true "$rate >= 0.5"
    check "no request failed ($(report "$work/shared.json" overall.errors))" \
        test "$(report "$work/shared.json" overall.errors)" -eq 0
}

# Counts access-log lines (requests as nginx finished them) between two
# times, by an awk condition over t, status, addrs (the upstreams tried,
# "A, B" after a retry), last (the one that answered) and statuses.
access_count() {
    local from=$1 to=$2 condition=$3
    awk -v from="$from" -v to="$to" '
        {
            t = $1; status = $2
            split($0, quoted, "\"")
            addrs = quoted[2]; statuses = quoted[4]
            last = addrs; sub(/.*, /, "", last)
        }
        t >= from && t < to && ('"$condition"') { n++ }
        END { print n + 0 }' "$work/nginx/access.log"
}

successes() {
    metric "$1" batch_processing_requests_total 'outcome="success"'
}

test_sigterm() {
    local victim=2
    local addr=127.0.0.1:${http_port[victim]}
    echo "== 2. SIGTERM to replica $victim under load ($concurrency clients through nginx)"
    bench_start "$work/sigterm.json" load --url "$lb_url" -c "$concurrency" -d 10s --seed 303
    sleep 3
    local served_before
    served_before=$(successes "$victim")
    local t_term=$EPOCHREALTIME
    kill -TERM "${pids[replica$victim]}"
    wait_exit "replica$victim" 20
    local status=$exit_status
    local t_exit=$EPOCHREALTIME drained_in finished_after
    drained_in=$(calc "$t_exit - $t_term")
    finished_after=$(access_count "$t_term" "$t_exit" "status == 200 && last == \"$addr\"")
    echo "  replica $victim had served $served_before requests; after SIGTERM it still answered $finished_after (queued or already sent to it) and exited with status $status $(calc "int($drained_in * 1000)") ms later"
    check "replica $victim drained and exited 0 (status $status)" test "$status" -eq 0
    start_replica "$victim"
    wait_replica "$victim"
    bench_finish
    local t1=$EPOCHREALTIME
    local requests errors retried
    requests=$(report "$work/sigterm.json" overall.requests)
    errors=$(report "$work/sigterm.json" overall.errors)
    retried=$(access_count "$t_term" "$t1" 'addrs ~ /,/')
    echo "  $requests requests, $(report "$work/sigterm.json" overall.throughput_rps) requests/s; from SIGTERM on, nginx retried $retried on another replica (refused by the draining replica, or 503 from the restarted one while it loaded); errors $errors $(report "$work/sigterm.json" overall.errors_by_reason)"
    check "SIGTERM lost zero requests ($errors errors of $requests)" \
        test "$errors" -eq 0 -a "$requests" -gt 0
}

test_sigkill() {
    local victim=3 others=(1 2)
    local addr=127.0.0.1:${http_port[victim]}
    echo "== 3. SIGKILL to replica $victim under load ($concurrency clients through nginx), then restart"
    bench_start "$work/sigkill.json" load --url "$lb_url" -c "$concurrency" -d 30s --seed 404
    sleep 3
    local t_kill=$EPOCHREALTIME
    kill -KILL "${pids[replica$victim]}"
    wait_exit "replica$victim" 5
    # Give nginx a moment to notice, then watch 5 s with the replica dead.
    sleep 1
    local t_watch=$EPOCHREALTIME i
    local before=()
    for i in "${others[@]}"; do before[i]=$(successes "$i"); done
    sleep 5
    local t_restart=$EPOCHREALTIME
    local served_by_others=0
    for i in "${others[@]}"; do
        served_by_others=$((served_by_others + $(successes "$i") - before[i]))
    done
    start_replica "$victim"
    wait_replica "$victim"
    # nginx tries it again once fail_timeout has passed since its last
    # failure; then it gets its share.
    sleep $((fail_timeout_s + 1))
    local back_before back_after
    back_before=$(successes "$victim")
    sleep 2
    back_after=$(successes "$victim")
    local under_load=no
    if kill -0 "${pids[bench]}" 2>/dev/null; then under_load=yes; fi
    bench_finish
    local t_end=$EPOCHREALTIME

    local requests errors window
    requests=$(report "$work/sigkill.json" overall.requests)
    errors=$(report "$work/sigkill.json" overall.errors)
    window=$(calc "$t_restart - $t_watch")
    local total_in_window attempts_dead errors_late errors_at_kill
    total_in_window=$(access_count "$t_watch" "$t_restart" 1)
    attempts_dead=$(access_count "$t_watch" "$t_restart" "index(addrs, \"$addr\") > 0")
    errors_at_kill=$(access_count "$t_kill" "$t_watch" 'status != 200')
    local retried_at_kill
    retried_at_kill=$(access_count "$t_kill" "$t_watch" "index(addrs, \"$addr,\") > 0 && status == 200")
    errors_late=$(access_count "$t_watch" "$t_end" 'status != 200')
    # With max_fails=1 nginx tries a failed replica again once per
    # fail_timeout (one worker), and retries that request elsewhere.
    local allowed
    allowed=$(calc "int($window / $fail_timeout_s) + 1")
    echo "  $requests requests, $(report "$work/sigkill.json" overall.throughput_rps) requests/s, errors $errors $(report "$work/sigkill.json" overall.errors_by_reason)"
    echo "  nginx: in the second after the kill, $retried_at_kill requests failed on replica $victim (in flight, or refused) and were answered by another; errors $errors_at_kill, later $errors_late;" \
        "in the $(calc "int($window * 10) / 10") s with replica $victim dead, $total_in_window requests, $attempts_dead tried on it"
    echo "  replicas ${others[*]} served $served_by_others requests meanwhile; replica $victim after restart: $back_before then $back_after successes 2 s later"
    check "SIGKILL lost at most the requests in flight: $errors <= $concurrency (client concurrency)" \
        test "$errors" -le "$concurrency"
    check "the error count stopped growing: $errors_late errors at nginx from 1 s after the kill" \
        test "$errors_late" -eq 0
    check "nginx stopped sending to the dead replica: $attempts_dead attempts <= $allowed (one per fail_timeout) of $total_in_window requests" \
        test "$attempts_dead" -le "$allowed" -a "$total_in_window" -gt $((10 * allowed))
    check "the other replicas kept serving ($served_by_others requests)" test "$served_by_others" -gt 0
    check "the restarted replica serves again ($back_before -> $back_after successes, load still running: $under_load)" \
        test "$back_after" -gt "$back_before" -a "$under_load" = yes
}

# Streams live in one replica's memory: routed by the x-sequence-id
# header, every tick of an instrument must reach the replica that holds
# its window, or it is refused as an unknown stream (404).
test_streams() {
    local instruments=300
    echo "== 4. streams routed by sequence id ($instruments instruments, one tick per request, through nginx)"
    local i live total=0 holders=0
    local before=()
    for ((i = 1; i <= replicas; i++)); do
        before[i]=$(metric "$i" tickserve_streams_live)
    done
    bench "$work/streams.json" streams --url "$lb_url" --instruments "$instruments" \
        -c "$concurrency" -d 3s --seed 505
    local starts start_errors ticks errors
    starts=$(report "$work/streams.json" /streams.starts)
    start_errors=$(report "$work/streams.json" /streams.start_errors)
    ticks=$(report "$work/streams.json" overall.requests)
    errors=$(report "$work/streams.json" overall.errors)
    for ((i = 1; i <= replicas; i++)); do
        live=$(($(metric "$i" tickserve_streams_live) - before[i]))
        echo "  replica $i holds $live streams"
        total=$((total + live))
        if ((live > 0)); then holders=$((holders + 1)); fi
    done
    echo "  $starts streams started ($start_errors errors), then $ticks ticks, $(report "$work/streams.json" overall.throughput_rps) requests/s, errors $errors $(report "$work/streams.json" overall.errors_by_reason)"
    check "every stream started ($starts of $instruments, $start_errors errors)" \
        test "$starts" -eq "$instruments" -a "$start_errors" -eq 0
    check "every tick reached the replica holding its window ($errors errors of $ticks)" \
        test "$errors" -eq 0 -a "$ticks" -gt "$instruments"
    check "the replicas together hold one window per instrument ($total of $instruments)" \
        test "$total" -eq "$instruments"
    check "every replica holds a share of the streams ($holders of $replicas)" \
        test "$holders" -eq "$replicas"
    # The control: the same client without the routing header. nginx then
    # spreads its ticks over the replicas, and those that miss the one
    # holding their stream must be refused; were they answered, the checks
    # above would prove nothing about routing.
    local control=60
    bench "$work/streams-unrouted.json" streams --url "$lb_url" --instruments "$control" \
        -c "$concurrency" -d 1s --seed 506 --no-routing-header
    local unrouted_ticks unrouted_errors
    unrouted_ticks=$(report "$work/streams-unrouted.json" overall.requests)
    unrouted_errors=$(report "$work/streams-unrouted.json" overall.errors)
    echo "  control without x-sequence-id: $unrouted_errors errors of $unrouted_ticks ticks $(report "$work/streams-unrouted.json" overall.errors_by_reason)"
    check "without the header, ticks that reach another replica are refused ($unrouted_errors of $unrouted_ticks)" \
        test "$unrouted_errors" -gt 0 -a "$unrouted_ticks" -gt "$unrouted_errors"
}

run_test() {
    local started=$SECONDS
    start_all
    print_layout
    test_cache_direct
    test_cache_under_load
    test_streams
    test_sigterm
    test_sigkill
    echo "== $((SECONDS - started)) s; $failures failed checks"
    ((failures == 0))
}

# === measure ===

# Requests/s through nginx with 1, 2 and 3 replicas (distinct inputs, so
# every request runs the engine), and one replica without nginx as the
# baseline, all in one run on this machine.
run_measure() {
    local duration=${TICKSERVE_LOCAL_MEASURE_DURATION:-15s}
    local clients=${TICKSERVE_LOCAL_MEASURE_CONCURRENCY:-32}
    echo "== $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg); $bin"
    echo "== bench load -c $clients -d $duration, distinct inputs (every request runs the engine)"
    start_redis
    local empty
    empty=$(redis_memory)
    start_replica 1
    wait_replica 1
    local results=() serving=() seed=500 n rps p50 p99
    bench "$work/m0.json" load --url "http://127.0.0.1:${http_port[1]}" -c "$clients" -d "$duration" --seed "$seed"
    results+=("1 replica, no nginx|$(report "$work/m0.json" overall.throughput_rps)|$(report "$work/m0.json" overall.latency_ms.median)|$(report "$work/m0.json" overall.latency_ms.p99)|$(report "$work/m0.json" overall.errors) $(report "$work/m0.json" overall.errors_by_reason)")
    for n in 1 2 3; do
        if ((n > 1)); then
            start_replica "$n"
            wait_replica "$n"
        fi
        if [[ -n "${pids[nginx]:-}" ]]; then stop_nginx; fi
        serving+=("$n")
        start_nginx "${serving[@]}"
        seed=$((seed + 1))
        bench "$work/m$n.json" load --url "$lb_url" -c "$clients" -d "$duration" --seed "$seed"
        rps=$(report "$work/m$n.json" overall.throughput_rps)
        p50=$(report "$work/m$n.json" overall.latency_ms.median)
        p99=$(report "$work/m$n.json" overall.latency_ms.p99)
        results+=("$n replica(s) behind nginx|$rps|$p50|$p99|$(report "$work/m$n.json" overall.errors) $(report "$work/m$n.json" overall.errors_by_reason)")
    done
    echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    local keys used
    keys=$(redis-cli -p "$redis_port" -n 1 dbsize)
    used=$(($(redis_memory) - empty))
    echo "== Redis holds $keys cached rows in $used bytes more than when empty ($(calc "int($used / ($keys > 0 ? $keys : 1))") bytes per row)"
    printf '%-26s %12s %9s %9s  %s\n' setup requests/s "p50 ms" "p99 ms" errors
    local row
    for row in "${results[@]}"; do
        IFS='|' read -r n rps p50 p99 errors <<<"$row"
        printf '%-26s %12s %9s %9s  %s\n' "$n" "$rps" "$p50" "$p99" "$errors"
    done
}

# === demo ===

run_demo() {
    local seconds=${1:-600}
    start_all
    print_layout
    cat <<EOF

Try, from another terminal:
  curl -s $lb_url/v2/models/$model/infer -H 'Content-Type: application/json' -d @$root/fixtures/golden/cnn_lstm/request.json
  $bin bench load --url $lb_url -c 8 -d 20s --repeat-fraction 0.9
  kill -TERM ${pids[replica2]}     # replica 2 drains; nginx retries elsewhere
  tail -f $work/nginx/access.log   # time, status, upstreams tried, their statuses

Stopping everything in $seconds s, or on Ctrl-C.
EOF
    sleep "$seconds" &
    pids[sleep]=$!
    wait "${pids[sleep]}" || true
    unset "pids[sleep]"
}

case "$mode" in
    test) run_test ;;
    measure) run_measure ;;
    demo) run_demo "${2:-600}" ;;
esac
