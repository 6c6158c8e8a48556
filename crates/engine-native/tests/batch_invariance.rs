//! A row's output does not depend on the batch it runs in: the scheduler
//! merges, splits (preemptible chunks) and retries batches as load
//! demands, and the cache stores whatever batch computed a row, so the
//! same window must get the same bits whether it runs alone, in a chunk
//! or in a full batch. Checked at every precision, every SIMD level this
//! CPU has, and on one and two threads, for batch sizes on both sides of
//! every kernel's row grouping and of the fused LSTM input projection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{read_npy, root};

use tickserve_engine_native::{NativeEngine, Precision, available_simd};

const BATCHES: [usize; 9] = [1, 2, 3, 4, 7, 15, 16, 17, 40];

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Runs every batch size over the first rows of the fixture and compares
/// each row with the same row computed alone.
fn check(engine: &NativeEngine, what: &str) {
    let dir = root().join("fixtures/golden/cnn_lstm");
    let (shape, input) = read_npy(&dir.join("input.npy"));
    let row_len: usize = shape[1..].iter().product();
    let samples = shape[0].min(*BATCHES.iter().max().unwrap());
    let width = 3;
    let mut alone = vec![0.0f32; samples * width];
    for r in 0..samples {
        engine
            .infer_into(
                1,
                &input[r * row_len..(r + 1) * row_len],
                &mut alone[r * width..(r + 1) * width],
            )
            .unwrap();
    }
    for batch in BATCHES.into_iter().filter(|&b| b <= samples) {
        let mut together = vec![0.0f32; batch * width];
        engine
            .infer_into(batch, &input[..batch * row_len], &mut together)
            .unwrap();
        assert_eq!(
            bits(&together),
            bits(&alone[..batch * width]),
            "{what}: a batch of {batch} rows differs from the rows run alone"
        );
    }
}

#[test]
fn every_row_gets_the_same_bits_in_every_batch() {
    let model = root().join("models/cnn_lstm/1/model.onnx");
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Int8] {
        for simd in available_simd() {
            let engine = NativeEngine::load(&model)
                .unwrap()
                .with_simd(simd)
                .unwrap()
                .with_precision(precision);
            check(&engine, &format!("{precision} {simd:?} one thread"));
            let engine = engine.with_threads(2, 1).unwrap();
            check(&engine, &format!("{precision} {simd:?} two threads"));
        }
    }
}
