# Shared by deploy/local/run.sh and scripts/chaos.sh (sourced, not run):
# the tools both need, the tickserve binary, process bookkeeping and
# clean-up, free ports, Redis, replicas, nginx, metrics and bench
# helpers. The sourcing script
# sets mode, replicas, concurrency, drain_timeout, redis_timeout,
# fail_timeout_s, here and root first.

# === what it needs ===

for tool in redis-server redis-cli nginx curl python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "missing $tool (Debian: apt-get install redis-server nginx curl python3)" >&2
        exit 1
    fi
done

# === the binary ===

if [[ -n "${TICKSERVE_BIN:-}" ]]; then
    bin=$TICKSERVE_BIN
else
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ "$target_dir" == /* ]] || target_dir=$root/$target_dir
    if [[ "$mode" == measure ]]; then
        (cd "$root" && cargo build --release -p tickserve --locked --quiet)
        bin=$target_dir/release/tickserve
    else
        (cd "$root" && cargo build -p tickserve --locked --quiet)
        bin=$target_dir/debug/tickserve
    fi
fi
[[ -x "$bin" ]] || { echo "no tickserve binary at $bin" >&2; exit 1; }

# === processes and clean-up ===

work=$(mktemp -d "${TMPDIR:-/tmp}/tickserve-local.XXXXXX")
# name → pid of every process this script started and has not reaped.
declare -A pids=()
failures=0

cleanup() {
    local status=$? name
    trap - EXIT INT TERM
    for name in "${!pids[@]}"; do
        kill -TERM "${pids[$name]}" 2>/dev/null || true
    done
    # Replicas drain (nothing is queued by now), nginx and Redis stop at
    # once; anything still there after 5 s is killed.
    local deadline=$((SECONDS + 5))
    for name in "${!pids[@]}"; do
        while kill -0 "${pids[$name]}" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        kill -KILL "${pids[$name]}" 2>/dev/null || true
        wait "${pids[$name]}" 2>/dev/null || true
    done
    if ((status != 0)); then
        echo "== last log lines ($work)" >&2
        local log
        for log in "$work"/*.log "$work"/nginx/error.log; do
            [[ -s "$log" ]] || continue
            echo "-- $log" >&2
            tail -n 15 "$log" >&2
        done
    fi
    if [[ "${TICKSERVE_LOCAL_KEEP:-0}" == 1 ]]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    echo "error: $*" >&2
    exit 1
}

# Prints a checked count and remembers a failure; the test exits non-zero
# at the end when any check failed.
check() {
    local description=$1
    shift
    if "$@"; then
        echo "  ok    $description"
    else
        echo "  FAIL  $description"
        failures=$((failures + 1))
    fi
}

# Waits (bounded) for a process this script started to exit and sets
# exit_status. (bash reaps its children as they exit, so kill -0 fails
# once one is gone.)
exit_status=0
wait_exit() {
    local name=$1 limit=$2 pid=${pids[$1]}
    local deadline=$((SECONDS + limit))
    # (stderr muted: bash would report "Killed" for the SIGKILL test)
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done 2>/dev/null
    if kill -0 "$pid" 2>/dev/null; then
        die "$name (pid $pid) still running after ${limit}s"
    fi
    exit_status=0
    wait "$pid" 2>/dev/null || exit_status=$?
    unset "pids[$name]"
}

# N distinct free TCP ports on 127.0.0.1, below the ephemeral range so no
# outgoing connection can be holding one when a replica restarts on it.
free_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
want = int(sys.argv[1])
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
high = low if low > 21000 else 65536
candidates = list(range(20000, high))
random.shuffle(candidates)
found, held = [], []
for port in candidates:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    found.append(port)
    if len(found) == want:
        break
print(" ".join(map(str, found)))
PY
}

wait_ready() {
    local what=$1 url=$2 limit=$3
    local deadline=$((SECONDS + limit))
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        ((SECONDS < deadline)) || die "$what not ready at $url after ${limit}s"
        sleep 0.1
    done
}

read -r -a ports <<<"$(free_ports $((3 * replicas + 2)))"
((${#ports[@]} == 3 * replicas + 2)) || die "could not find free loopback ports"
redis_port=${ports[0]}
lb_port=${ports[1]}
declare -a http_port grpc_port metrics_port
for ((i = 1; i <= replicas; i++)); do
    http_port[i]=${ports[3 * i - 1]}
    grpc_port[i]=${ports[3 * i]}
    metrics_port[i]=${ports[3 * i + 1]}
done
lb_url=http://127.0.0.1:$lb_port

start_redis() {
    mkdir -p "$work/redis"
    # A cache, as in deploy/kubernetes/base/redis.yaml: no persistence.
    redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$work/redis" \
        --save '' --appendonly no --daemonize no --logfile "$work/redis.log" &
    pids[redis]=$!
    local deadline=$((SECONDS + 10))
    until [[ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" == PONG ]]; do
        ((SECONDS < deadline)) || die "redis-server did not start on port $redis_port"
        sleep 0.1
    done
}

redis_memory() {
    redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ { print $2 + 0 }'
}

start_replica() {
    local i=$1
    "$bin" serve \
        --model-repository "$root/models" \
        --http-addr "127.0.0.1:${http_port[i]}" \
        --grpc-addr "127.0.0.1:${grpc_port[i]}" \
        --metrics-addr "127.0.0.1:${metrics_port[i]}" \
        --redis-url "redis://127.0.0.1:$redis_port" \
        --redis-timeout "$redis_timeout" \
        --drain-timeout "$drain_timeout" \
        --log-level warn \
        >>"$work/replica$i.log" 2>&1 &
    pids[replica$i]=$!
}

wait_replica() {
    wait_ready "replica $1" "http://127.0.0.1:${http_port[$1]}/v2/health/ready" 60
}

# Writes the nginx configuration for replicas $@ and starts nginx.
start_nginx() {
    local dir=$work/nginx i servers="" user=""
    mkdir -p "$dir/tmp"
    for i in "$@"; do
        servers+="        server 127.0.0.1:${http_port[i]} max_fails=1 fail_timeout=${fail_timeout_s}s;"$'\n'
    done
    if [[ "$(id -u)" -eq 0 ]]; then
        # The master runs as root and its worker as nobody, which must be
        # able to reach the temp directories nginx creates for it.
        user="user nobody $(id -gn nobody);"
        chmod 0755 "$work" "$dir"
    fi
    local conf
    conf=$(<"$here/nginx.conf.template")
    conf=${conf//@SERVERS@/${servers%$'\n'}}
    conf=${conf//@USER@/$user}
    conf=${conf//@PORT@/$lb_port}
    conf=${conf//@PREFIX@/$dir}
    printf '%s\n' "$conf" >"$dir/nginx.conf"
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -t -q ||
        die "nginx rejected $dir/nginx.conf"
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
    pids[nginx]=$!
    wait_ready nginx "$lb_url/v2/health/ready" 10
}

stop_nginx() {
    kill -QUIT "${pids[nginx]}"
    wait_exit nginx 10
}

# Sum of a metric's samples on replica $1 whose labels contain every
# `label="value"` given after the name.
metric() {
    local i=$1 name=$2
    shift 2
    curl -fsS --max-time 2 "http://127.0.0.1:${metrics_port[i]}/metrics" |
        awk -v name="$name" -v filters="$*" '
            BEGIN { n = split(filters, want, " ") }
            index($1, name "{") == 1 {
                for (k = 1; k <= n; k++) if (index($1, want[k]) == 0) next
                sum += $NF
            }
            END { printf "%d\n", sum }'
}

# `tickserve bench MODE ARGS…` with a JSON report at $1, in the
# background (bench_start, then bench_finish) or in the foreground
# (bench). Exit 3 (the default SLA missed) is fine: the checks read the
# report.
bench_start() {
    local report=$1
    shift
    timeout 120 "$bin" bench "$@" --warmup 0 --quiet --format none --json "$report" &
    pids[bench]=$!
}

bench_finish() {
    wait_exit bench 130
    ((exit_status == 0 || exit_status == 3)) || die "tickserve bench failed (exit $exit_status)"
}

bench() {
    bench_start "$@"
    bench_finish
}

# Reads overall.KEY (or any dotted path) from a bench JSON report's
# result; a path starting with / from the top of the report.
report() {
    python3 -c 'import json, sys
value = json.load(open(sys.argv[1]))
path = sys.argv[2]
if path.startswith("/"):
    path = path[1:]
else:
    value = value["result"]
for key in path.split("."):
    value = value[key]
print(json.dumps(value) if isinstance(value, dict) else (round(value, 1) if isinstance(value, float) else value))' "$1" "$2"
}

# Floating-point comparison and arithmetic through awk.
calc() { awk "BEGIN { print ($*) }"; }
percent() { awk "BEGIN { printf \"%.1f\", 100 * ($*) }"; }
is_true() { [[ "$(calc "$1")" == 1 ]]; }

start_all() {
    start_redis
    for ((i = 1; i <= replicas; i++)); do
        start_replica "$i"
    done
    for ((i = 1; i <= replicas; i++)); do
        wait_replica "$i"
    done
    local all=()
    for ((i = 1; i <= replicas; i++)); do all+=("$i"); done
    start_nginx "${all[@]}"
}

print_layout() {
    echo "redis      redis://127.0.0.1:$redis_port"
    for ((i = 1; i <= replicas; i++)); do
        echo "replica $i  http://127.0.0.1:${http_port[i]}  metrics http://127.0.0.1:${metrics_port[i]}/metrics  (pid ${pids[replica$i]:-stopped})"
    done
    echo "nginx      $lb_url  (config and access log in $work/nginx)"
}
