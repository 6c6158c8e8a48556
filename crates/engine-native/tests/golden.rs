//! The native engine against PyTorch's own outputs (fixtures written by
//! `tools/export_reference.py`): the bundled reference model and two
//! variants of the family, at every batch size, within 1e-5.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{read_npy, root};

use tickserve_engine::{Batch, Engine, EngineError};
use tickserve_engine_native::{NativeEngine, Simd, available_simd};

struct Golden {
    engine: NativeEngine,
    input_shape: Vec<usize>,
    input: Vec<f32>,
    output: Vec<f32>,
    width: usize,
}

fn golden(model: &Path, name: &str) -> Golden {
    golden_at(model, name, tickserve_engine_native::detect_simd())
}

/// The fixture with the fp32 kernels forced to `simd`.
fn golden_at(model: &Path, name: &str, simd: Simd) -> Golden {
    let engine = NativeEngine::load(model).unwrap().with_simd(simd).unwrap();
    assert_eq!(engine.simd(), simd);
    let dir = root().join("fixtures/golden").join(name);
    let (input_shape, input) = read_npy(&dir.join("input.npy"));
    let (output_shape, output) = read_npy(&dir.join("output.npy"));
    Golden {
        engine,
        input_shape,
        input,
        output,
        width: output_shape[1],
    }
}

/// Runs every batch size from 1 to `max_batch` over the fixture's rows
/// (wrapping around) and compares each row with PyTorch's.
fn check_all_batch_sizes(g: &Golden, max_batch: usize) {
    let samples = g.input_shape[0];
    let row_len: usize = g.input_shape[1..].iter().product();
    let mut worst = 0.0f32;
    for batch in 1..=max_batch {
        let rows: Vec<usize> = (0..batch).map(|i| (i * 7 + batch) % samples).collect();
        let mut data = Vec::with_capacity(batch * row_len);
        for &r in &rows {
            data.extend_from_slice(&g.input[r * row_len..(r + 1) * row_len]);
        }
        let out = g
            .engine
            .infer(&Batch {
                rows: batch,
                inputs: vec![data],
            })
            .unwrap();
        assert_eq!(out.rows, batch);
        let got = &out.outputs[0];
        assert_eq!(got.len(), batch * g.width);
        for (i, &r) in rows.iter().enumerate() {
            for j in 0..g.width {
                let diff = (got[i * g.width + j] - g.output[r * g.width + j]).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= 1e-5,
                    "batch {batch}, row {i} (sample {r}), output {j}: {} vs {} (diff {diff})",
                    got[i * g.width + j],
                    g.output[r * g.width + j]
                );
            }
        }
    }
    eprintln!("max abs diff over batch sizes 1..={max_batch}: {worst:e}");
}

#[test]
fn reference_model_matches_pytorch_at_every_batch_size() {
    let g = golden(&root().join("models/cnn_lstm/1/model.onnx"), "cnn_lstm");
    let sig = g.engine.signature();
    assert_eq!(sig.inputs[0].name, "input");
    assert_eq!(sig.inputs[0].dims, vec![50, 60]);
    assert_eq!(sig.outputs[0].name, "output");
    assert_eq!(sig.outputs[0].dims, vec![3]);
    let arch = g.engine.architecture();
    assert_eq!(
        (arch.conv_layers, arch.lstm_layers, arch.head_layers),
        (2, 2, 2)
    );
    check_all_batch_sizes(&g, 32);
    // The whole fixture in one call, larger than the default max batch.
    check_all_batch_sizes_once(&g, g.input_shape[0]);
}

fn check_all_batch_sizes_once(g: &Golden, batch: usize) {
    let out = g
        .engine
        .infer(&Batch {
            rows: batch,
            inputs: vec![g.input.clone()],
        })
        .unwrap();
    for (a, b) in out.outputs[0].iter().zip(&g.output) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
}

#[test]
fn every_simd_level_matches_pytorch_at_every_batch_size() {
    // The test above runs the best level; this forces each one the CPU
    // has (portable included), on the reference model and both variants.
    let levels = available_simd();
    eprintln!("SIMD levels on this CPU: {levels:?}");
    for simd in levels {
        eprintln!("{simd:?}:");
        let g = golden_at(
            &root().join("models/cnn_lstm/1/model.onnx"),
            "cnn_lstm",
            simd,
        );
        check_all_batch_sizes(&g, 32);
        for name in ["variant_a", "variant_b"] {
            let path = root().join("fixtures/models").join(name).join("model.onnx");
            check_all_batch_sizes(&golden_at(&path, name, simd), 16);
        }
    }
}

#[test]
fn a_simd_level_the_cpu_lacks_is_refused() {
    let path = root().join("models/cnn_lstm/1/model.onnx");
    for simd in [Simd::Avx512, Simd::Avx2, Simd::Portable] {
        let result = NativeEngine::load(&path).unwrap().with_simd(simd);
        assert_eq!(result.is_ok(), available_simd().contains(&simd), "{simd:?}");
    }
}

#[test]
fn reference_outputs_vary_with_the_input() {
    // A fixture whose logits barely move would make every numeric test weak.
    let g = golden(&root().join("models/cnn_lstm/1/model.onnx"), "cnn_lstm");
    let rows = g.output.len() / g.width;
    for j in 0..g.width {
        let col: Vec<f32> = (0..rows).map(|r| g.output[r * g.width + j]).collect();
        let mean = col.iter().sum::<f32>() / rows as f32;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / rows as f32;
        assert!(var.sqrt() > 0.1, "output {j} has std {}", var.sqrt());
    }
}

/// The golden check of `fixtures/models/{name}`, whose input rows are
/// `steps × features` and whose output rows are `width` wide.
fn variant(name: &str, [steps, features]: [usize; 2], width: usize) -> Golden {
    let g = golden(
        &root().join(format!("fixtures/models/{name}/model.onnx")),
        name,
    );
    assert_eq!(g.engine.signature().inputs[0].dims, vec![steps, features]);
    assert_eq!(g.engine.signature().outputs[0].dims, vec![width]);
    g
}

#[test]
fn variant_a_one_conv_kernel_5_one_lstm_layer() {
    let g = variant("variant_a", [20, 8], 5);
    check_all_batch_sizes(&g, 16);
}

#[test]
fn variant_b_unpadded_convs_three_lstm_layers_width_one() {
    let g = variant("variant_b", [30, 12], 1);
    let arch = g.engine.architecture();
    assert_eq!((arch.conv_layers, arch.lstm_layers), (2, 3));
    check_all_batch_sizes(&g, 16);
}

#[test]
fn a_graph_outside_the_family_is_refused_naming_the_node() {
    let err =
        NativeEngine::load(&root().join("fixtures/models/unsupported/model.onnx")).unwrap_err();
    let EngineError::Unsupported(message) = &err else {
        panic!("expected Unsupported, got {err:?}");
    };
    assert!(message.contains("GRU"), "{message}");
    assert!(message.contains("node"), "{message}");
}

#[test]
fn a_file_that_is_not_onnx_is_refused() {
    let dir = tickserve_test_support::fresh_dir("tickserve-not-onnx");
    let path = dir.join("model.onnx");
    std::fs::write(&path, b"this is not a protobuf \xff\xff\xff").unwrap();
    let err = NativeEngine::load(&path).unwrap_err();
    assert!(matches!(err, EngineError::Unreadable { .. }), "{err:?}");
    assert!(err.to_string().contains("model.onnx"), "{err}");
    let missing = NativeEngine::load(&dir.join("absent.onnx")).unwrap_err();
    assert!(missing.to_string().contains("absent.onnx"), "{missing}");
}

/// The bundled model on the calling thread, the same with
/// `with_threads(threads, callers)`, and the golden input.
fn single_and_threaded(threads: usize, callers: usize) -> (NativeEngine, NativeEngine, Vec<f32>) {
    let path = root().join("models/cnn_lstm/1/model.onnx");
    let single = NativeEngine::load(&path).unwrap();
    let threaded = NativeEngine::load(&path)
        .unwrap()
        .with_threads(threads, callers)
        .unwrap();
    let (_, input) = read_npy(&root().join("fixtures/golden/cnn_lstm/input.npy"));
    (single, threaded, input)
}

#[test]
fn splitting_a_batch_across_threads_gives_the_same_results() {
    let (single, split, input) = single_and_threaded(3, 1);
    for rows in [1usize, 2, 3, 7, 32] {
        let batch = Batch {
            rows,
            inputs: vec![input[..rows * 3000].to_vec()],
        };
        let a = single.infer(&batch).unwrap();
        let b = split.infer(&batch).unwrap();
        assert_eq!(b.rows, rows);
        for (x, y) in a.outputs[0].iter().zip(&b.outputs[0]) {
            assert!((x - y).abs() <= 1e-5, "batch {rows}: {x} vs {y}");
        }
    }
}

#[test]
fn batches_from_concurrent_callers_give_the_same_results() {
    // Helpers sized for two callers at once (two scheduler instances).
    let (single, shared, input) = single_and_threaded(2, 2);
    // One row (the two-stage pipeline) and two split batches, from three
    // callers: one more than the helpers were sized for.
    let batches: Vec<Batch> = [1usize, 5, 8]
        .iter()
        .map(|&rows| Batch {
            rows,
            inputs: vec![input[(8 - rows) * 3000..8 * 3000].to_vec()],
        })
        .collect();
    let expected: Vec<Vec<f32>> = batches
        .iter()
        .map(|b| single.infer(b).unwrap().outputs[0].clone())
        .collect();
    std::thread::scope(|scope| {
        for (batch, expected) in batches.iter().zip(&expected) {
            let shared = &shared;
            scope.spawn(move || {
                for _ in 0..20 {
                    let got = shared.infer(batch).unwrap();
                    for (x, y) in expected.iter().zip(&got.outputs[0]) {
                        assert!((x - y).abs() <= 1e-5, "batch {}: {x} vs {y}", batch.rows);
                    }
                }
            });
        }
    });
}

#[test]
fn a_one_row_batch_pipelined_across_two_threads_is_bit_identical() {
    // The reference model (2 LSTM layers) and variant_b (3) run the
    // pipeline; variant_a (1 LSTM) runs on the calling thread.
    for (model, name) in [
        (root().join("models/cnn_lstm/1/model.onnx"), "cnn_lstm"),
        (
            root().join("fixtures/models/variant_a/model.onnx"),
            "variant_a",
        ),
        (
            root().join("fixtures/models/variant_b/model.onnx"),
            "variant_b",
        ),
    ] {
        for simd in available_simd() {
            let g = golden_at(&model, name, simd);
            let piped = NativeEngine::load(&model)
                .unwrap()
                .with_simd(simd)
                .unwrap()
                .with_threads(2, 1)
                .unwrap();
            let row_len: usize = g.input_shape[1..].iter().product();
            // Repeated calls reuse the workspaces and the hand-off buffer.
            for round in 0..3 {
                for r in 0..g.input_shape[0] {
                    let batch = Batch {
                        rows: 1,
                        inputs: vec![g.input[r * row_len..(r + 1) * row_len].to_vec()],
                    };
                    let one = g.engine.infer(&batch).unwrap().outputs[0].clone();
                    let two = piped.infer(&batch).unwrap().outputs[0].clone();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&one),
                        bits(&two),
                        "{name} {simd:?} row {r} round {round}"
                    );
                }
            }
        }
    }
}
