//! The native engine's precisions against ONNX Runtime, in one run, on
//! the same inputs, 1 thread: ONNX Runtime fp32 (and its dynamically
//! quantised int8 model when `TICKSERVE_ORT_INT8_MODEL` names one, and the
//! committed QDQ model), then the native engine at fp32, bf16, int8
//! dynamic, int8 static (calibrated on models/cnn_lstm/calibration.npy,
//! min/max) and on the QDQ model; median and p99 per call, samples/s and
//! the ratios to both ONNX Runtime baselines. The engines are measured in
//! interleaved rounds, so the ratios hold even when the machine's load
//! changes during the run.
//!
//! First, the error table: every engine on the 64 golden windows of the
//! reference model against PyTorch's fp32 outputs (max and mean abs,
//! argmax agreement).
//!
//! `scripts/bench-precision.sh` installs ONNX Runtime, writes the int8
//! model with `onnxruntime.quantization.quantize_dynamic` and runs this.
//!
//! Environment: `BENCH_SECONDS` (per configuration, default 1.5).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::{Calibration, CalibrationMethod, NativeEngine, Precision};
use tickserve_engine_ort::OrtEngine;
use tickserve_test_support::read_npy;

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

/// Each engine on the golden windows (one batch) against PyTorch fp32.
fn error_table(root: &Path, engines: &[(String, Box<dyn Engine>)]) {
    let (shape, input) = read_npy(&root.join("fixtures/golden/cnn_lstm/input.npy"));
    let (_, golden) = read_npy(&root.join("fixtures/golden/cnn_lstm/output.npy"));
    let batch = Batch {
        rows: shape[0],
        inputs: vec![input],
    };
    let argmax = |row: &[f32]| (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
    println!("error on the {} golden windows vs PyTorch fp32\n", shape[0]);
    println!("| engine | max abs | mean abs | argmax agreement |");
    println!("|---|---|---|---|");
    for (name, engine) in engines {
        let out = engine.infer(&batch).unwrap_or_else(|e| panic!("{e}"));
        let got = &out.outputs[0];
        let diffs: Vec<f32> = got
            .iter()
            .zip(&golden)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let width = golden.len() / shape[0];
        let agree = (0..shape[0])
            .filter(|&r| {
                let row = r * width..(r + 1) * width;
                argmax(&got[row.clone()]) == argmax(&golden[row])
            })
            .count();
        println!(
            "| {name} | {:.2e} | {:.2e} | {:.1} % |",
            diffs.iter().copied().fold(0.0, f32::max),
            diffs.iter().sum::<f32>() / diffs.len() as f32,
            100.0 * agree as f64 / shape[0] as f64
        );
    }
    println!();
}

fn main() {
    let budget = tickserve_test_support::bench_budget(1.5);
    let root = tickserve_test_support::root();
    let model = root.join("models/cnn_lstm/1/model.onnx");
    let qdq = root.join("fixtures/models/cnn_lstm_qdq/model.onnx");
    let mut engines: Vec<(String, Box<dyn Engine>)> = Vec::new();
    match tickserve_engine_ort::is_available() {
        Ok(()) => {
            let ort = OrtEngine::load(&model, 1, 1).unwrap_or_else(|e| panic!("{e}"));
            engines.push(("onnxruntime fp32".into(), Box::new(ort)));
            if let Some(path) = std::env::var_os("TICKSERVE_ORT_INT8_MODEL").map(PathBuf::from) {
                let ort = OrtEngine::load(&path, 1, 1).unwrap_or_else(|e| panic!("{e}"));
                engines.push(("onnxruntime int8 (dynamic)".into(), Box::new(ort)));
            }
            let ort = OrtEngine::load(&qdq, 1, 1).unwrap_or_else(|e| panic!("{e}"));
            engines.push(("onnxruntime int8 QDQ model".into(), Box::new(ort)));
        }
        Err(reason) => println!("ONNX Runtime not measured: {reason}"),
    }
    for precision in Precision::ALL {
        let native = NativeEngine::load(&model)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_precision(precision);
        engines.push((format!("native {precision}"), Box::new(native)));
    }
    let calibration = Calibration::read_npy(
        &root.join("models/cnn_lstm/calibration.npy"),
        CalibrationMethod::MinMax,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let loading = Instant::now();
    let native = NativeEngine::load(&model)
        .and_then(|e| e.with_static_int8(&calibration))
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "static int8: load and calibration on {} windows took {:.0} ms\n",
        calibration.shape[0],
        loading.elapsed().as_secs_f64() * 1e3
    );
    engines.push(("native int8 static".into(), Box::new(native)));
    let native = NativeEngine::load(&qdq).unwrap_or_else(|e| panic!("{e}"));
    engines.push(("native int8 QDQ model".into(), Box::new(native)));
    error_table(&root, &engines);
    println!("1 thread; ratios are samples/s over the baseline's, same run\n");
    println!("| engine | batch | median ms | p99 ms | samples/s | vs ORT fp32 | vs ORT int8 |");
    println!("|---|---|---|---|---|---|---|");
    for rows in BATCHES {
        let batch = Batch {
            rows,
            inputs: vec![tickserve_test_support::sine_input(rows * 3000)],
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
                ratio("onnxruntime int8 (dynamic)"),
            );
            rates.push((name.clone(), rate));
        }
    }
}
