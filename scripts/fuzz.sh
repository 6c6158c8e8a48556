#!/usr/bin/env bash
# Fuzzes every decoder that takes outside bytes (fuzz/fuzz_targets/: JSON,
# binary-tensor and MessagePack infer bodies, gRPC ModelInferRequest,
# gzip/deflate bodies, ONNX loader + recogniser, model config parsers) with
# libFuzzer, SECONDS each (default 60), and prints a table: executions,
# coverage (libFuzzer's cov: edges, ft: features), corpus size, crashes.
#
#   scripts/fuzz.sh                  # 60 s per target
#   scripts/fuzz.sh 600              # 10 minutes per target
#   scripts/fuzz.sh 30 infer_json    # some targets only
#   KEEP=1 scripts/fuzz.sh 600       # also merge the new inputs (minimised) into fuzz/corpus
#
# Runs on the stable toolchain without cargo-fuzz: it builds fuzz/ with the
# coverage instrumentation cargo-fuzz would pass (SanitizerCoverage: inline
# 8-bit counters, PC table, compare tracing; `--cfg fuzzing`; debug
# assertions and overflow checks on), without AddressSanitizer (needs
# -Zsanitizer; the decoders are safe Rust). With cargo-fuzz installed,
# `cd fuzz && cargo fuzz run <target>` works as well (nightly, or
# RUSTC_BOOTSTRAP=1 on stable).
#
# A crash, timeout or out-of-memory input lands in fuzz/artifacts/<target>/;
# the run then fails. Fix the decoder and keep the file: the corpus replay
# test (crates/server/tests/fuzz_corpus.rs, part of scripts/test.sh) feeds
# every corpus and artifact file to the same entry points in CI.
# fuzz/corpus/ seeds come from `cargo run -p tickserve-server --example fuzz_seeds`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all=(infer_json infer_binary infer_msgpack grpc_infer compressed_body onnx_model model_config)
[ $# -gt 0 ] && targets=("$@") || targets=("${all[@]}")

if [ ! -d fuzz/corpus/infer_json ]; then
    echo "== writing the seed corpus"
    cargo run -q -p tickserve-server --example fuzz_seeds -- fuzz/corpus
fi

host=$(rustc -vV | sed -n 's/^host: //p')
echo "== building the fuzz targets (release, instrumented, $host)"
# --target keeps the flags off build scripts and proc macros.
(
    cd fuzz
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
        cargo build --release --target "$host" --bins
)
bin=fuzz/target/$host/release

report=$(mktemp)
failed=0
for target in "${targets[@]}"; do
    run=fuzz/corpus-run/$target
    mkdir -p "$run" "fuzz/artifacts/$target"
    log=fuzz/corpus-run/$target.log
    before=$(find "fuzz/artifacts/$target" -type f | wc -l)
    echo "== $target: ${seconds}s"
    # Large ONNX seeds: let inputs grow to twice the largest one.
    max_len=$(( $(find "fuzz/corpus/$target" -type f -printf '%s\n' | sort -n | tail -1) * 2 ))
    [ "$max_len" -lt 4096 ] && max_len=4096
    "$bin/$target" "$run" "fuzz/corpus/$target" \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 >"$log" 2>&1 || true
    after=$(find "fuzz/artifacts/$target" -type f | wc -l)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    corpus=$(find "$run" -type f | wc -l)
    crashes=$((after - before))
    [ "$crashes" -gt 0 ] && failed=1 && tail -30 "$log"
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$target" "$seconds" "${execs:-?}" "${rate:-?}" \
        "${cov:-?}" "$corpus" "$crashes" >>"$report"
    if [ "${KEEP:-0}" = 1 ]; then
        "$bin/$target" -merge=1 "fuzz/corpus/$target" "$run" >/dev/null 2>&1 || true
    fi
done

echo
echo "| target | seconds | executions | exec/s | coverage | corpus | new crash files |"
echo "|---|---|---|---|---|---|---|"
cat "$report"
rm -f "$report"
exit "$failed"
