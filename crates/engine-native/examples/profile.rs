//! Runs the bundled model in a loop, for profilers (`perf record`,
//! `valgrind --tool=callgrind`):
//!
//! `cargo run --release -p tickserve-engine-native --example profile -- [batch] [seconds] [threads] [fp32|bf16|int8]`

use std::path::Path;
use std::time::{Duration, Instant};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::{NativeEngine, Precision};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let seconds: f64 = args.next().map_or(Ok(3.0), |a| a.parse())?;
    let threads: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let precision = args
        .next()
        .map_or(Some(Precision::Fp32), |a| Precision::parse(&a));
    let precision = precision.ok_or("precision must be fp32, bf16 or int8")?;
    let engine = NativeEngine::load(&model)?
        .with_threads(threads, 1)?
        .with_precision(precision);
    let batch = Batch {
        rows,
        inputs: vec![tickserve_test_support::sine_input(rows * 3000)],
    };
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        engine.infer(&batch)?;
        calls += 1;
    }
    let per_call = started.elapsed().as_secs_f64() / calls as f64;
    println!(
        "batch {rows}, {threads} thread(s), {precision}: {:.3} ms per call, {:.0} samples/s, {calls} calls",
        per_call * 1e3,
        rows as f64 / per_call
    );
    Ok(())
}
