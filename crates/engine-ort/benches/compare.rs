//! The native engine against ONNX Runtime in one run, on the same inputs:
//! 1 and 2 threads, batch 1, 8, 32, 128 — median and p99 per call,
//! samples/s, GFLOP/s, the ratio to ONNX Runtime, and the machine's fp32
//! peak from a large GEMM measured by this same run, so each engine's
//! distance to the limit is visible.
//!
//! `scripts/bench-engines.sh` installs ONNX Runtime and runs this; without
//! `ORT_DYLIB_PATH` only the native engine is measured.
//!
//! Environment: `BENCH_SECONDS` (per configuration, default 1.5).

use std::path::Path;
use std::time::{Duration, Instant};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::NativeEngine;
use tickserve_engine_ort::OrtEngine;

const BATCHES: [usize; 4] = [1, 8, 32, 128];

struct Measured {
    median: Duration,
    p99: Duration,
}

fn measure(engine: &dyn Engine, batch: &Batch, budget: Duration) -> Measured {
    for _ in 0..3 {
        let _ = engine.infer(batch);
    }
    let mut times = Vec::new();
    let started = Instant::now();
    while (started.elapsed() < budget || times.len() < 20) && times.len() < 100_000 {
        let t = Instant::now();
        let out = engine.infer(batch);
        times.push(t.elapsed());
        assert!(out.is_ok(), "inference failed: {out:?}");
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Measured {
        median: at(0.5),
        p99: at(0.99),
    }
}

/// fp32 GFLOP/s of an n³ GEMM on `threads` threads, each running its own
/// product (best of three).
fn gemm_peak(threads: usize) -> f64 {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut c = vec![0.0f32; n * n];
                    // SAFETY: every matrix is n×n, row-major, and `c` is a
                    // fresh buffer that aliases neither input.
                    unsafe {
                        gemm::gemm(
                            n,
                            n,
                            n,
                            c.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            a.as_ptr(),
                            1,
                            n as isize,
                            b.as_ptr(),
                            1,
                            n as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    std::hint::black_box(&c);
                });
            }
        });
        let flops = 2.0 * (n as f64).powi(3) * threads as f64;
        best = best.max(flops / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let budget = tickserve_test_support::bench_budget(1.5);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let flops_per_row = NativeEngine::load(&model)
        .map(|e| e.architecture().flops_per_row as f64)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", model.display()));
    let ort_available = tickserve_engine_ort::is_available();
    if let Err(reason) = &ort_available {
        println!("ONNX Runtime not measured: {reason}");
    }
    let peak = [gemm_peak(1), gemm_peak(2)];
    println!(
        "fp32 peak (2048³ GEMM, gemm crate): {:.1} GFLOP/s on 1 thread, {:.1} on 2",
        peak[0], peak[1]
    );
    println!("model: {:.2} MFLOP per sample\n", flops_per_row / 1e6);
    println!(
        "| engine | threads | batch | median ms | p99 ms | samples/s | GFLOP/s | % of peak | vs ONNX Runtime |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for threads in [1usize, 2] {
        let native = match NativeEngine::load(&model) {
            Ok(e) => e.with_threads(threads, 1).unwrap_or_else(|e| panic!("{e}")),
            Err(e) => panic!("{e}"),
        };
        let ort = ort_available
            .as_ref()
            .ok()
            .map(|()| OrtEngine::load(&model, threads, 1).unwrap_or_else(|e| panic!("{e}")));
        for rows in BATCHES {
            let batch = Batch {
                rows,
                inputs: vec![tickserve_test_support::sine_input(rows * 3000)],
            };
            let ort_result = ort.as_ref().map(|e| measure(e, &batch, budget));
            let native_result = measure(&native, &batch, budget);
            let rate = |m: &Measured| rows as f64 / m.median.as_secs_f64();
            let row = |name: &str, m: &Measured, ratio: String| {
                let gflops = rate(m) * flops_per_row / 1e9;
                println!(
                    "| {name} | {threads} | {rows} | {:.3} | {:.3} | {:.0} | {:.1} | {:.0} % | {ratio} |",
                    m.median.as_secs_f64() * 1e3,
                    m.p99.as_secs_f64() * 1e3,
                    rate(m),
                    gflops,
                    100.0 * gflops / peak[threads - 1],
                );
            };
            if let Some(o) = &ort_result {
                row("onnxruntime", o, "1.00×".into());
            }
            let ratio = ort_result.as_ref().map_or("–".into(), |o| {
                format!("{:.2}×", rate(&native_result) / rate(o))
            });
            row("native", &native_result, ratio);
        }
    }
}
