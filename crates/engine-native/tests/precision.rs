//! Reduced precision on the trained fixtures: the error each precision
//! costs against PyTorch's fp32 outputs, within the bounds
//! docs/optimization.md states (reference model: int8 max abs ≤ 2e-2,
//! bf16 ≤ 1e-2, argmax agreement ≥ 99 %), at several batch sizes so
//! every kernel tile shape runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{argmax, read_npy, root};

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::{NativeEngine, Precision};

struct Figures {
    max_abs: f32,
    argmax_agreement: f64,
}

/// Runs the fixture in chunks of `batch` rows at `precision`.
fn figures(model: &Path, name: &str, precision: Precision, batch: usize) -> Figures {
    let engine = NativeEngine::load(model).unwrap().with_precision(precision);
    assert_eq!(engine.precision(), precision);
    assert_eq!(engine.variant(), format!("native/{precision}"));
    let dir = root().join("fixtures/golden").join(name);
    let (shape, input) = read_npy(&dir.join("input.npy"));
    let (out_shape, expected) = read_npy(&dir.join("output.npy"));
    let (samples, width) = (shape[0], out_shape[1]);
    let row_len: usize = shape[1..].iter().product();
    let mut got = Vec::new();
    let mut start = 0;
    while start < samples {
        let rows = batch.min(samples - start);
        let out = engine
            .infer(&Batch {
                rows,
                inputs: vec![input[start * row_len..(start + rows) * row_len].to_vec()],
            })
            .unwrap();
        got.extend_from_slice(&out.outputs[0]);
        start += rows;
    }
    let max_abs = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let agree = (0..samples)
        .filter(|&r| {
            argmax(&got[r * width..(r + 1) * width])
                == argmax(&expected[r * width..(r + 1) * width])
        })
        .count();
    Figures {
        max_abs,
        argmax_agreement: agree as f64 / samples as f64,
    }
}

fn check(model: &Path, name: &str, precision: Precision, max_abs: f32, classifier: bool) {
    for batch in [1, 5, 64] {
        let f = figures(model, name, precision, batch);
        eprintln!(
            "{name} {precision} batch {batch}: max abs {:.3e}, argmax agreement {:.1} %",
            f.max_abs,
            100.0 * f.argmax_agreement
        );
        assert!(
            f.max_abs <= max_abs,
            "{name} {precision} batch {batch}: max abs error {:e} > {max_abs:e}",
            f.max_abs
        );
        if classifier {
            assert!(f.argmax_agreement >= 0.99, "{name} {precision}: argmax");
        }
        if precision == Precision::Fp32 {
            assert!(f.max_abs <= 1e-5);
        }
    }
}

#[test]
fn reference_model_int8_and_bf16_stay_within_their_error_bounds() {
    let model = root().join("models/cnn_lstm/1/model.onnx");
    check(&model, "cnn_lstm", Precision::Fp32, 1e-5, true);
    check(&model, "cnn_lstm", Precision::Int8, 2e-2, true);
    // The goal; measured 5.7e-3 with the last head layer in fp32.
    check(&model, "cnn_lstm", Precision::Bf16, 1e-2, true);
}

#[test]
fn variants_int8_and_bf16_stay_within_their_error_bounds() {
    let a = root().join("fixtures/models/variant_a/model.onnx");
    let b = root().join("fixtures/models/variant_b/model.onnx");
    // variant_a's logits are larger (std up to 7.4): measured 3.9e-2
    // (int8) and 2.0e-2 (bf16). variant_b regresses (std 0.7): 3.0e-3.
    check(&a, "variant_a", Precision::Int8, 5e-2, true);
    check(&a, "variant_a", Precision::Bf16, 2.5e-2, true);
    for p in [Precision::Int8, Precision::Bf16] {
        check(&b, "variant_b", p, 1e-2, false);
    }
}

#[test]
fn precision_round_trips_through_its_name() {
    for p in Precision::ALL {
        assert_eq!(Precision::parse(p.as_str()), Some(p));
    }
    assert_eq!(Precision::parse("fp16"), None);
}
