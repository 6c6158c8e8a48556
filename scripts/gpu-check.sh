#!/usr/bin/env bash
# The CUDA engine's checks on a GPU machine that has no Rust toolchain and
# no network: golden outputs at every precision, throughput and latency,
# and PyTorch on the same GPU for comparison (docs/gpu.md).
#
# Two halves:
#
#   scripts/gpu-check.sh prepare [DIR]   # here, with Rust: build the release
#                                        # binaries and copy them, this script
#                                        # and the PyTorch side into DIR (.gpu)
#   bash DIR/gpu-check.sh                # there, from the repository root
#                                        # (models/ and fixtures/ are read)
#
# Results go to $OUT (default ./gpu-out): `log` (everything) and
# `results.jsonl` (one JSON object per measurement). Each step is
# time-boxed and a failing step does not stop the others; the whole run
# takes 2-3 minutes on an H200.
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "${1:-}" = "prepare" ]; then
    dest="${2:-.gpu}"
    set -e
    mkdir -p "$dest"
    cargo build --release -p tickserve-engine-cuda --examples
    cargo build --release -p tickserve
    # The GPU tests, run there with TICKSERVE_REQUIRE_CUDA=1 (they find the
    # fixtures through the path they were built at; see below).
    cargo test --release --no-run -p tickserve-engine-cuda --test gpu \
        -p tickserve-repository --test repository --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
        while read -r name exe; do cp "$exe" "$dest/test-$name"; strip "$dest/test-$name" 2>/dev/null || true; done
    pwd > "$dest/built-at"
    cp target/release/examples/gpu_check "$dest/gpu_check"
    strip "$dest/gpu_check" 2>/dev/null || true
    if [ -x target/release/tickserve ]; then
        cp target/release/tickserve "$dest/tickserve"
        strip "$dest/tickserve" 2>/dev/null || true
    fi
    cp "$here/gpu-check.sh" "$here/gpu_torch_reference.py" "$here/gpu-server-load.sh" "$dest/"
    du -sh "$dest"
    echo "now, on the GPU machine, from the repository root: bash $dest/gpu-check.sh"
    exit 0
fi

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
ROOT="${ROOT:-.}"
BIN="$here/gpu_check"
WORK="$(mktemp -d)"
exec > >(tee -a "$OUT/log") 2>&1

step() { echo; echo "=== $(date -u +%T) $*"; }
# run_step NAME SECONDS COMMAND...: time-boxed, never aborts the script.
run_step() {
    local name="$1" limit="$2"
    shift 2
    step "$name (limit ${limit}s)"
    local started=$SECONDS
    timeout -k 5 "$limit" "$@"
    local rc=$?
    echo "--- $name: rc=$rc in $((SECONDS - started))s"
    return 0
}

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1 || echo "no nvidia-smi"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 || echo "no torch"

step "CUDA libraries"
site="$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)"
libdirs=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64; do
    [ -d "$d" ] && libdirs="$libdirs:$d"
done
if [ -n "$site" ] && [ -d "$site/nvidia" ]; then
    while IFS= read -r d; do libdirs="$libdirs:$d"; done < <(
        find "$site/nvidia" \( -name 'libcublas*.so*' -o -name 'libnvrtc*.so*' \) -printf '%h\n' 2>/dev/null | sort -u)
fi
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so libcublas.so libcublasLt.so libnvrtc.so libnvrtc-builtins.so; do
    echo "$lib: $(for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/$lib* 2>/dev/null; done | tr '\n' ' ')"
done
# cudarc opens the unversioned or major-versioned name: make sure one exists.
shim="$WORK/lib"
mkdir -p "$shim"
for lib in libcublas libcublasLt libnvrtc libcuda; do
    for d in ${LD_LIBRARY_PATH//:/ }; do
        f="$(ls "$d/$lib.so."* 2>/dev/null | head -1)"
        if [ -n "$f" ]; then
            [ -e "$d/$lib.so" ] || ln -sf "$f" "$shim/$lib.so"
            break
        fi
    done
done
export LD_LIBRARY_PATH="$shim:$LD_LIBRARY_PATH"
ls -l "$shim"

run_step "weights for PyTorch" 30 "$BIN" weights "$ROOT" "$WORK/weights"
run_step "golden checks (tickserve CUDA engine)" 150 "$BIN" golden "$ROOT"
run_step "throughput and latency (tickserve CUDA engine)" 150 "$BIN" bench "$ROOT" "${BENCH_SECONDS:-0.7}"
PYTHONUNBUFFERED=1 run_step "PyTorch on the same GPU" 200 python3 "$here/gpu_torch_reference.py" "$WORK/weights" "$ROOT" "${BENCH_SECONDS:-0.7}"

# The GPU tests look for the fixtures where they were built: make that
# path lead to this checkout.
if [ -f "$here/built-at" ] && [ ! -e "$(cat "$here/built-at")" ]; then
    mkdir -p "$(dirname "$(cat "$here/built-at")")" && ln -s "$(pwd)" "$(cat "$here/built-at")"
fi
for t in "$here"/test-*; do
    [ -x "$t" ] && TICKSERVE_REQUIRE_CUDA=1 TICKSERVE_REPO_ROOT="$(pwd)" run_step "$(basename "$t") with TICKSERVE_REQUIRE_CUDA=1" 120 "$t" --nocapture --test-threads 1
done

if [ -x "$here/tickserve" ] && [ -f "$here/gpu-server-load.sh" ]; then
    run_step "server under load (CPU engine, then CUDA engine)" 120 bash "$here/gpu-server-load.sh" "$here/tickserve" "$ROOT" "${LOAD_SECONDS:-8}"
fi

step "summary"
grep -h '^RESULT ' "$OUT/log" | sed 's/^RESULT //' > "$OUT/results.jsonl"
python3 - "$OUT/results.jsonl" <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("golden (max abs error vs the fixtures' PyTorch fp32 outputs):")
for r in rows:
    if r.get("check") == "golden":
        eng = r.get("engine", "tickserve-cuda") + (f" {r['steps']}" if "steps" in r else "") + ("" if r.get("graphs", True) else " no-graphs")
        err = r.get("max_abs", max(r.get("max_abs_full", -1), r.get("max_abs_single", -1), r.get("max_abs_parts", -1)))
        print(f"  {eng:28} {r['model']:10} {r['precision']:5} {err:.3e} {'' if r.get('pass', True) else 'FAIL'} {r.get('error') or ''}")
for r in rows:
    if r.get("check") == "threads":
        print(f"  tickserve-cuda from {r['threads']} threads, {r['workers']} workers: {r.get('max_abs', r.get('error'))} {'' if r['pass'] else 'FAIL'}")
print("bench (per call: pinned copy in, forward, copy out):")
print(f"  {'engine':22} {'prec':5} {'batch':>6} {'p50 ms':>9} {'p99 ms':>9} {'samples/s':>12}")
for r in rows:
    if r.get("check") == "bench" and "p50_ms" in r:
        print(f"  {r['engine']:22} {r['precision']:5} {r['batch']:6} {r['p50_ms']:9.4f} {r['p99_ms']:9.4f} {r['samples_per_s']:12,}")
    elif r.get("check") == "bench":
        print(f"  {r['engine']:22} {r['precision']:5} {r['batch']:6} error {r.get('error')}")
EOF
echo "results: $OUT/log, $OUT/results.jsonl"
rm -rf "$WORK"
