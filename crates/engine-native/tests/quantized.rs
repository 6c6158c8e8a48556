//! Static int8 (scales from a calibration set) and QDQ models (the
//! model's own QuantizeLinear/DequantizeLinear scales) on the reference
//! model's golden windows, which are not among the calibration windows
//! (tools/export_reference.py: seeds 7001 and 9001).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{argmax, read_npy, root};

use tickserve_engine::{Batch, Engine, EngineError};
use tickserve_engine_native::{Calibration, CalibrationMethod, NativeEngine, Precision};

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    use npyz::WriterBuilder;
    let mut bytes = Vec::new();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(&mut bytes)
        .begin_nd()
        .unwrap();
    writer.extend(data.iter().copied()).unwrap();
    writer.finish().unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn reference_model() -> NativeEngine {
    NativeEngine::load(&root().join("models/cnn_lstm/1/model.onnx")).unwrap()
}

fn calibration(method: CalibrationMethod) -> Calibration {
    Calibration::read_npy(&root().join("models/cnn_lstm/calibration.npy"), method).unwrap()
}

/// The golden windows through `engine` in chunks of `batch` rows.
fn run(engine: &NativeEngine, batch: usize) -> Vec<f32> {
    let (shape, input) = read_npy(&root().join("fixtures/golden/cnn_lstm/input.npy"));
    let row_len: usize = shape[1..].iter().product();
    let mut got = Vec::new();
    for chunk in input.chunks(batch * row_len) {
        let rows = chunk.len() / row_len;
        let out = engine
            .infer(&Batch {
                rows,
                inputs: vec![chunk.to_vec()],
            })
            .unwrap();
        got.extend_from_slice(&out.outputs[0]);
    }
    got
}

/// Max abs difference, mean abs difference, argmax agreement (3 logits).
fn compare(got: &[f32], expected: &[f32]) -> (f32, f32, f64) {
    assert_eq!(got.len(), expected.len());
    let diffs: Vec<f32> = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let max = diffs.iter().copied().fold(0.0, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let rows = got.len() / 3;
    let agree = (0..rows)
        .filter(|&r| argmax(&got[r * 3..r * 3 + 3]) == argmax(&expected[r * 3..r * 3 + 3]))
        .count();
    (max, mean, agree as f64 / rows as f64)
}

#[test]
fn static_int8_stays_within_the_int8_error_bound() {
    let (_, golden) = read_npy(&root().join("fixtures/golden/cnn_lstm/output.npy"));
    // Measured: min/max 1.81e-2 (the int8 goal is 2e-2); percentile
    // 99.999 2.10e-2: cutting the tails saturates more than the finer
    // steps gain on this model (99.99: 4.5e-2, 99.9: 0.44).
    for (method, bound) in [
        (CalibrationMethod::MinMax, 2e-2),
        (CalibrationMethod::Percentile(99.999), 2.5e-2),
    ] {
        let engine = reference_model()
            .with_static_int8(&calibration(method))
            .unwrap();
        assert_eq!(engine.precision(), Precision::Int8);
        assert_eq!(engine.variant(), "native/int8-static");
        for batch in [1, 5, 64] {
            let (max, mean, agree) = compare(&run(&engine, batch), &golden);
            eprintln!(
                "int8 static {method:?} batch {batch}: max abs {max:.3e}, mean abs {mean:.3e}, argmax {:.1} %",
                agree * 100.0
            );
            assert!(max <= bound, "{method:?} batch {batch}: max abs {max:e}");
            assert!(agree >= 0.99);
        }
    }
}

#[test]
fn static_int8_differs_from_dynamic_and_switching_back_is_dynamic() {
    let static_engine = reference_model()
        .with_static_int8(&calibration(CalibrationMethod::MinMax))
        .unwrap();
    let dynamic = reference_model().with_precision(Precision::Int8);
    assert_ne!(run(&static_engine, 8), run(&dynamic, 8));
    let back = static_engine.with_precision(Precision::Int8);
    assert_eq!(back.variant(), "native/int8");
    assert_eq!(run(&back, 8), run(&dynamic, 8));
}

#[test]
fn a_bad_calibration_file_is_refused_with_a_clear_error() {
    let dir = tickserve_test_support::fresh_dir("tickserve-calibration");

    let missing = Calibration::read_npy(&dir.join("absent.npy"), CalibrationMethod::MinMax)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("cannot read calibration file") && missing.contains("absent.npy"));

    let not_npy = dir.join("text.npy");
    std::fs::write(&not_npy, "not numpy").unwrap();
    let err = Calibration::read_npy(&not_npy, CalibrationMethod::MinMax)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a .npy file"), "{err}");

    let ints = dir.join("ints.npy");
    write_npy(&ints, &[1, 50, 60], &vec![1i64; 3000]);
    let err = Calibration::read_npy(&ints, CalibrationMethod::MinMax)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not float32"), "{err}");

    let shaped = |name: &str, shape: &[u64], value: f32| {
        let path = dir.join(name);
        let len = shape.iter().product::<u64>() as usize;
        write_npy(&path, shape, &vec![value; len]);
        Calibration::read_npy(&path, CalibrationMethod::MinMax).unwrap()
    };
    let refuse = |calibration: &Calibration| match reference_model().with_static_int8(calibration) {
        Err(EngineError::Unsupported(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let reason = refuse(&shaped("features.npy", &[4, 50, 59], 0.5));
    assert!(
        reason.contains("features.npy") && reason.contains("expected [samples, 50, 60]"),
        "{reason}"
    );
    let reason = refuse(&shaped("empty.npy", &[0, 50, 60], 0.5));
    assert!(reason.contains("[0, 50, 60]"), "{reason}");
    let reason = refuse(&shaped("flat.npy", &[3000], 0.5));
    assert!(reason.contains("expected [samples"), "{reason}");
    let reason = refuse(&shaped("nan.npy", &[1, 50, 60], f32::NAN));
    assert!(reason.contains("non-finite"), "{reason}");
    let mut bad_percentile = shaped("ok.npy", &[1, 50, 60], 0.5);
    bad_percentile.method = CalibrationMethod::Percentile(101.0);
    assert!(refuse(&bad_percentile).contains("percentile"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ONNX Runtime 1.32 on the QDQ fixture (tools/export_reference.py writes
/// it): the QDQ semantics with ORT's own int8 kernels.
#[test]
fn qdq_model_runs_with_its_own_scales_close_to_onnx_runtime() {
    let engine =
        NativeEngine::load(&root().join("fixtures/models/cnn_lstm_qdq/model.onnx")).unwrap();
    assert!(engine.is_qdq());
    assert_eq!(engine.variant(), "native/int8-qdq");
    // The configured precision does not replace the model's own.
    let engine = engine.with_precision(Precision::Fp32);
    assert_eq!(engine.variant(), "native/int8-qdq");
    assert!(matches!(
        NativeEngine::load(&root().join("fixtures/models/cnn_lstm_qdq/model.onnx"))
            .unwrap()
            .with_static_int8(&calibration(CalibrationMethod::MinMax)),
        Err(EngineError::Unsupported(_))
    ));
    let (_, ort) = read_npy(&root().join("fixtures/golden/cnn_lstm_qdq/ort_output.npy"));
    let (_, golden) = read_npy(&root().join("fixtures/golden/cnn_lstm/output.npy"));
    let (_, ort_vs_golden, _) = compare(&ort, &golden);
    for batch in [1, 5, 64] {
        let got = run(&engine, batch);
        let (max, mean, agree) = compare(&got, &ort);
        eprintln!(
            "qdq batch {batch}: vs ORT max abs {max:.3e}, mean {mean:.3e}, argmax {:.1} %",
            agree * 100.0
        );
        let (gmax, gmean, gagree) = compare(&got, &golden);
        eprintln!(
            "qdq batch {batch}: vs fp32 golden max abs {gmax:.3e}, mean {gmean:.3e}, argmax {:.1} % (ORT vs golden: mean {ort_vs_golden:.3e})",
            gagree * 100.0
        );
        // Both round the same real numbers to the same grids; a value that
        // lands on the other side of a rounding tie (different fp32
        // summation order in the fp32 LSTM, fused vs separate multiply-add)
        // moves by one quantum: at most 4.4e-3 on a logit through the last
        // int8 layer (its input step 0.021 × largest weight 0.21). 1e-2
        // allows two such flips in one output; measured: 0 (bit-identical).
        assert!(max <= 1e-2, "batch {batch}: {max:e} from ONNX Runtime");
        assert!(
            gmax <= 3e-2 && gagree >= 0.99,
            "batch {batch}: {gmax:e} from fp32"
        );
    }
}

/// variant_a fully quantised by ONNX Runtime's defaults: the first Conv
/// reads the quantised model input, ReLUs are folded into the
/// quantisation (zero point 0), the output is quantised too.
#[test]
fn a_fully_quantised_qdq_model_matches_onnx_runtime() {
    let engine =
        NativeEngine::load(&root().join("fixtures/models/variant_a_qdq/model.onnx")).unwrap();
    assert_eq!(engine.variant(), "native/int8-qdq");
    let (shape, input) = read_npy(&root().join("fixtures/golden/variant_a/input.npy"));
    let (_, ort) = read_npy(&root().join("fixtures/golden/variant_a_qdq/ort_output.npy"));
    let out = engine
        .infer(&Batch {
            rows: shape[0],
            inputs: vec![input],
        })
        .unwrap();
    let max = out.outputs[0]
        .iter()
        .zip(&ort)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("variant_a qdq: max abs vs ORT {max:e}");
    // The output itself is quantised (step 0.0886): a tie rounded the
    // other way after a different fp32 summation order is one step.
    // Measured: 0 (bit-identical).
    assert!(max <= 0.0886 * 1.01, "{max:e} from ONNX Runtime");
}
