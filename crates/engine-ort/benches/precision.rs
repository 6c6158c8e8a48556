//! The native engine's precisions against ONNX Runtime, in one run, on
//! the same inputs, 1 thread: ONNX Runtime fp32 (and its dynamically
//! quantised int8 model when `TICKSERVE_ORT_INT8_MODEL` names one), then
//! the native engine at fp32, bf16 and int8; median and p99 per call,
//! samples/s and the ratios to both ONNX Runtime baselines. The engines
//! are measured in interleaved rounds, so the ratios hold even when the
//! machine's load changes during the run.
//!
//! `scripts/bench-precision.sh` installs ONNX Runtime, writes the int8
//! model with `onnxruntime.quantization.quantize_dynamic` and runs this.
//!
//! Environment: `BENCH_SECONDS` (per configuration, default 1.5).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::{NativeEngine, Precision};
use tickserve_engine_ort::OrtEngine;

const BATCHES: [usize; 3] = [1, 8, 32];

/// Rounds each engine measures per batch size, interleaved, so a change in
/// the machine's load (it is shared) hits every engine alike.
const ROUNDS: usize = 6;

fn timed_calls(engine: &dyn Engine, batch: &Batch, budget: Duration, times: &mut Vec<Duration>) {
    let started = Instant::now();
    let mut calls = 0;
    while (started.elapsed() < budget || calls < 5) && calls < 20_000 {
        let t = Instant::now();
        let out = engine.infer(batch);
        times.push(t.elapsed());
        calls += 1;
        assert!(out.is_ok(), "inference failed: {out:?}");
    }
}

fn median_and_p99(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn main() {
    let budget = Duration::from_secs_f64(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.5),
    );
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let mut engines: Vec<(String, Box<dyn Engine>)> = Vec::new();
    match tickserve_engine_ort::is_available() {
        Ok(()) => {
            let ort = OrtEngine::load(&model, 1, 1).unwrap_or_else(|e| panic!("{e}"));
            engines.push(("onnxruntime fp32".into(), Box::new(ort)));
            if let Some(path) = std::env::var_os("TICKSERVE_ORT_INT8_MODEL").map(PathBuf::from) {
                let ort = OrtEngine::load(&path, 1, 1).unwrap_or_else(|e| panic!("{e}"));
                engines.push(("onnxruntime int8 (dynamic)".into(), Box::new(ort)));
            }
        }
        Err(reason) => println!("ONNX Runtime not measured: {reason}"),
    }
    for precision in Precision::ALL {
        let native = NativeEngine::load(&model)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_precision(precision);
        engines.push((format!("native {precision}"), Box::new(native)));
    }
    println!("1 thread; ratios are samples/s over the baseline's, same run\n");
    println!("| engine | batch | median ms | p99 ms | samples/s | vs ORT fp32 | vs ORT int8 |");
    println!("|---|---|---|---|---|---|---|");
    for rows in BATCHES {
        let data: Vec<f32> = (0..rows * 3000)
            .map(|i| ((i as f32) * 0.013).sin())
            .collect();
        let batch = Batch {
            rows,
            inputs: vec![data],
        };
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); engines.len()];
        for (_, engine) in &engines {
            for _ in 0..3 {
                let _ = engine.infer(&batch);
            }
        }
        for _ in 0..ROUNDS {
            for ((_, engine), t) in engines.iter().zip(&mut times) {
                timed_calls(engine.as_ref(), &batch, budget / ROUNDS as u32, t);
            }
        }
        let mut rates: Vec<(String, f64)> = Vec::new();
        for ((name, _), t) in engines.iter().zip(&mut times) {
            let (median, p99) = median_and_p99(t);
            let rate = rows as f64 / median.as_secs_f64();
            let ratio = |base: &str| {
                rates
                    .iter()
                    .find(|(n, _)| n.starts_with(base))
                    .map_or("–".to_string(), |(_, r)| format!("{:.2}×", rate / r))
            };
            println!(
                "| {name} | {rows} | {:.3} | {:.3} | {rate:.0} | {} | {} |",
                median.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                ratio("onnxruntime fp32"),
                ratio("onnxruntime int8"),
            );
            rates.push((name.clone(), rate));
        }
    }
}
