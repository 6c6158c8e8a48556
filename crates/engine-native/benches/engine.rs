//! Native engine throughput on the bundled reference model at batch 1, 8,
//! 32 and 128 (one thread). Criterion reports time per call and
//! samples/s (`thrpt`); compare runs on the same machine only.
//!
//! `cargo bench -p tickserve-engine-native --bench engine`

use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::NativeEngine;

fn engine_batches(c: &mut Criterion) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let engine = match NativeEngine::load(&model) {
        Ok(engine) => engine,
        Err(e) => panic!("cannot load {}: {e}", model.display()),
    };
    let row_len = 50 * 60;
    let mut group = c.benchmark_group("cnn_lstm");
    for batch in [1usize, 8, 32, 128] {
        let input = Batch {
            rows: batch,
            inputs: vec![tickserve_test_support::sine_input(batch * row_len)],
        };
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("native", batch), &input, |b, input| {
            b.iter(|| engine.infer(std::hint::black_box(input)))
        });
    }
    group.finish();
}

criterion_group!(benches, engine_batches);
criterion_main!(benches);
