//! Latency of calls that arrive after the engine has been idle: on one
//! thread, on two (helpers spinning for the default time after each call)
//! and on two with `helper_spin` zero (helpers park at once). Back-to-back calls (the benches) find the helper
//! thread awake; a server's real-time requests often arrive after a gap,
//! when the helper is parked and its core may be asleep.
//!
//! `cargo run --release -p tickserve-engine-native --example idle_gaps -- [rows] [gap µs ...]`
//!
//! For each gap, the engines run in alternating blocks of 100 calls (the
//! first 5 of each block are not counted), each call after sleeping
//! `gap` µs; percentiles are per call.

use std::path::Path;
use std::time::{Duration, Instant};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::NativeEngine;

const BLOCKS: usize = 10;
const BLOCK: usize = 100;
const WARM_UP: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let mut gaps: Vec<u64> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if gaps.is_empty() {
        gaps = vec![0, 300, 1000];
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let engines = [
        ("1 thread ", NativeEngine::load(&model)?),
        ("2 threads", NativeEngine::load(&model)?.with_threads(2, 1)?),
        (
            "2 threads, helper_spin 0",
            NativeEngine::load(&model)?
                .with_threads(2, 1)?
                .with_helper_spin(Duration::ZERO),
        ),
    ];
    let batch = Batch {
        rows,
        inputs: vec![tickserve_test_support::sine_input(rows * 3000)],
    };
    for gap in gaps {
        let mut times: [Vec<f64>; 3] = Default::default();
        for _ in 0..BLOCKS {
            for ((_, engine), times) in engines.iter().zip(times.iter_mut()) {
                for call in 0..BLOCK {
                    if gap > 0 {
                        std::thread::sleep(Duration::from_micros(gap));
                    }
                    let started = Instant::now();
                    engine.infer(&batch)?;
                    if call >= WARM_UP {
                        times.push(started.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        for ((name, _), times) in engines.iter().zip(times.iter_mut()) {
            times.sort_by(f64::total_cmp);
            let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            println!(
                "batch {rows}, gap {gap:>5} µs, {name}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
                at(0.5),
                at(0.9),
                at(0.99)
            );
        }
    }
    Ok(())
}
