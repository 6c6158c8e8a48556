//! Pruning on every architecture the export script produces (cnn_lstm:
//! two convs and two LSTM layers; variant_a: one conv, kernel 5; variant_b:
//! two unpadded convs, the second 1×1, three LSTM layers): the shapes and
//! sparsity reached, and outputs checked against the unpruned model, against
//! a model whose removed channels were dead anyway, and against ONNX
//! Runtime on the same pruned file.
//!
//! The ONNX Runtime test needs its library (`ORT_DYLIB_PATH`); with
//! `TICKSERVE_REQUIRE_ORT=1` (scripts/test.sh) a missing library fails it,
//! otherwise it prints that it was skipped, and why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::NativeEngine;
use tickserve_engine_ort::OrtEngine;
use tickserve_model_tools::npy;
use tickserve_model_tools::onnx::{self, FloatTensor};
use tickserve_model_tools::prune::{PruneOptions, prune_bytes};

use tickserve_test_support::{max_abs_diff, root};

/// (model file, golden fixture, [(conv weight, dims after 25 % channel
/// pruning)], LSTM input weight name and dims after).
struct Arch {
    model: &'static str,
    fixture: &'static str,
    convs: &'static [(&'static str, &'static [usize])],
    lstm: (&'static str, &'static [usize]),
}

const ARCHS: [Arch; 3] = [
    Arch {
        model: "models/cnn_lstm/1/model.onnx",
        fixture: "cnn_lstm",
        convs: &[
            ("conv.0.weight", &[48, 60, 3]),
            ("conv.2.weight", &[48, 48, 3]),
        ],
        lstm: ("onnx::LSTM_207", &[1, 512, 48]),
    },
    Arch {
        model: "fixtures/models/variant_a/model.onnx",
        fixture: "variant_a",
        convs: &[("conv.0.weight", &[12, 8, 5])],
        lstm: ("onnx::LSTM_119", &[1, 128, 12]),
    },
    Arch {
        model: "fixtures/models/variant_b/model.onnx",
        fixture: "variant_b",
        convs: &[
            ("conv.0.weight", &[18, 12, 3]),
            ("conv.2.weight", &[12, 18, 1]),
        ],
        lstm: ("onnx::LSTM_283", &[1, 96, 12]),
    },
];

fn model(path: &str) -> Vec<u8> {
    std::fs::read(root().join(path)).unwrap()
}

fn golden(fixture: &str) -> npy::Dataset {
    npy::read(
        &root()
            .join("fixtures/golden")
            .join(fixture)
            .join("input.npy"),
    )
    .unwrap()
}

fn run(engine: &dyn Engine, data: &npy::Dataset) -> Vec<f32> {
    engine
        .infer(&Batch {
            rows: data.rows(),
            inputs: vec![data.values.clone()],
        })
        .unwrap()
        .outputs
        .remove(0)
}

fn weight(bytes: &[u8], name: &str) -> FloatTensor {
    let model = onnx::decode(bytes).unwrap();
    onnx::read_float(model.graph.as_ref().unwrap(), name).unwrap()
}

fn lstm_input_weight_name(bytes: &[u8]) -> String {
    let model = onnx::decode(bytes).unwrap();
    let graph = model.graph.unwrap();
    let lstm = graph
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("LSTM"))
        .unwrap();
    lstm.input[1].clone()
}

#[test]
fn no_pruning_changes_nothing_but_the_metadata() {
    let nothing = PruneOptions {
        sparsity: 0.0,
        channels: 0.0,
    };
    for arch in &ARCHS {
        let original = model(arch.model);
        let (pruned, report) = prune_bytes(&original, &nothing).unwrap();
        assert_eq!(report.record, "l1=0.00,channels=0.00");
        assert!(report.layers.iter().all(|l| l.dims_before == l.dims_after));
        let (a, b) = (
            onnx::decode(&original).unwrap(),
            onnx::decode(&pruned).unwrap(),
        );
        assert_eq!(a.graph, b.graph, "{}", arch.model);
        assert_eq!(a.opset_import, b.opset_import);

        let data = golden(arch.fixture);
        let before = NativeEngine::from_bytes(&original).unwrap();
        let after = NativeEngine::from_bytes(&pruned).unwrap();
        assert_eq!(run(&before, &data), run(&after, &data), "{}", arch.model);
        assert_eq!(after.pruning(), Some("l1=0.00,channels=0.00"));
        assert_eq!(after.variant(), "native/fp32+pruned(l1=0.00,channels=0.00)");
        assert_eq!(before.variant(), "native/fp32");
    }
}

#[test]
fn magnitude_pruning_reaches_the_sparsity_in_every_conv_and_linear_layer() {
    let original = model("models/cnn_lstm/1/model.onnx");
    let (pruned, report) = prune_bytes(&original, &PruneOptions::default()).unwrap();
    assert_eq!(report.record, "l1=0.30,channels=0.00");
    let names: Vec<&str> = report.layers.iter().map(|l| l.weight.as_str()).collect();
    assert_eq!(
        names,
        [
            "conv.0.weight",
            "conv.2.weight",
            "head.0.weight",
            "head.2.weight"
        ]
    );
    for layer in &report.layers {
        let before = weight(&original, &layer.weight);
        let after = weight(&pruned, &layer.weight);
        assert_eq!(before.dims, after.dims);
        let target = (0.3 * before.len() as f64).round() as usize;
        let zeros = after.values.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, target, "{}", layer.weight);
        assert_eq!(layer.zeros, zeros);
        // The zeros are the smallest magnitudes; every survivor is unchanged.
        let largest_removed = before
            .values
            .iter()
            .zip(&after.values)
            .filter(|(_, a)| **a == 0.0)
            .map(|(b, _)| b.abs())
            .fold(0.0, f32::max);
        for (b, a) in before.values.iter().zip(&after.values) {
            if *a != 0.0 {
                assert_eq!(a, b);
                assert!(b.abs() >= largest_removed);
            }
        }
    }
    // The LSTM weights are not magnitude-pruned.
    let lstm = lstm_input_weight_name(&original);
    assert_eq!(weight(&original, &lstm), weight(&pruned, &lstm));

    // The pruned model still classifies the golden windows mostly alike.
    let data = golden("cnn_lstm");
    let a = run(&NativeEngine::from_bytes(&original).unwrap(), &data);
    let b = run(&NativeEngine::from_bytes(&pruned).unwrap(), &data);
    assert!(b.iter().all(|v| v.is_finite()));
    assert_ne!(a, b);
}

#[test]
fn channel_pruning_shrinks_each_conv_and_the_layer_that_reads_it() {
    let options = PruneOptions {
        sparsity: 0.0,
        channels: 0.25,
    };
    for arch in &ARCHS {
        let original = model(arch.model);
        assert_eq!(lstm_input_weight_name(&original), arch.lstm.0);
        let (pruned, report) = prune_bytes(&original, &options).unwrap();
        for (name, dims) in arch.convs {
            assert_eq!(weight(&pruned, name).dims, *dims, "{} {name}", arch.model);
            let bias = name.replace("weight", "bias");
            assert_eq!(weight(&pruned, &bias).dims, [dims[0]], "{bias}");
            let layer = report.layers.iter().find(|l| l.weight == *name).unwrap();
            assert_eq!(layer.dims_after, *dims);
        }
        assert_eq!(
            weight(&pruned, arch.lstm.0).dims,
            arch.lstm.1,
            "{}",
            arch.model
        );
        assert!(pruned.len() < original.len());

        // The channels kept are those of the largest filter norms.
        let (first, dims) = arch.convs[0];
        let before = weight(&original, first);
        let filter = before.dims[1] * before.dims[2];
        let norms: Vec<f32> = before
            .values
            .chunks(filter)
            .map(|f| f.iter().map(|w| w * w).sum::<f32>().sqrt())
            .collect();
        let mut sorted = norms.clone();
        sorted.sort_by(f32::total_cmp);
        let cut = sorted[before.dims[0] - dims[0]];
        let after = weight(&pruned, first);
        let kept: Vec<&[f32]> = after.values.chunks(filter).collect();
        let expected: Vec<&[f32]> = before
            .values
            .chunks(filter)
            .zip(&norms)
            .filter(|(_, n)| **n >= cut)
            .map(|(f, _)| f)
            .collect();
        assert_eq!(kept, expected, "{}", arch.model);

        let engine = NativeEngine::from_bytes(&pruned).unwrap();
        let full = NativeEngine::from_bytes(&original).unwrap();
        assert!(engine.architecture().flops_per_row < full.architecture().flops_per_row);
        assert_eq!(engine.signature(), full.signature());
    }
}

/// Zeroes the filters and biases of the first 25 % of each conv's output
/// channels: those channels then carry relu(0) = 0, they have the smallest
/// filter norms, and removing them must not change the model's outputs.
fn kill_quarter_of_channels(bytes: &[u8]) -> Vec<u8> {
    let mut model = onnx::decode(bytes).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let convs: Vec<(String, String)> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
        .map(|n| (n.input[1].clone(), n.input[2].clone()))
        .collect();
    for (w, b) in convs {
        let mut weights = onnx::read_float(graph, &w).unwrap();
        let count = (0.25 * weights.dims[0] as f64).round() as usize;
        let filter = weights.dims[1] * weights.dims[2];
        weights.values[..count * filter].fill(0.0);
        onnx::write_float(graph, &w, &weights).unwrap();
        let mut bias = onnx::read_float(graph, &b).unwrap();
        bias.values[..count].fill(0.0);
        onnx::write_float(graph, &b, &bias).unwrap();
    }
    onnx::encode(&model)
}

#[test]
fn removing_dead_channels_keeps_the_outputs() {
    for arch in &ARCHS {
        let dead = kill_quarter_of_channels(&model(arch.model));
        let (pruned, _) = prune_bytes(
            &dead,
            &PruneOptions {
                sparsity: 0.0,
                channels: 0.25,
            },
        )
        .unwrap();
        assert_eq!(weight(&pruned, arch.lstm.0).dims, arch.lstm.1);
        let data = golden(arch.fixture);
        let full = run(&NativeEngine::from_bytes(&dead).unwrap(), &data);
        let narrow = run(&NativeEngine::from_bytes(&pruned).unwrap(), &data);
        let diff = max_abs_diff(&full, &narrow);
        assert!(diff <= 1e-5, "{}: {diff}", arch.model);
    }
}

#[test]
fn pruning_twice_keeps_both_records_and_bad_requests_are_refused() {
    let original = model("fixtures/models/variant_a/model.onnx");
    let (once, _) = prune_bytes(&original, &PruneOptions::default()).unwrap();
    let (twice, report) = prune_bytes(
        &once,
        &PruneOptions {
            sparsity: 0.1,
            channels: 0.5,
        },
    )
    .unwrap();
    assert_eq!(report.record, "l1=0.30,channels=0.00;l1=0.10,channels=0.50");
    let engine = NativeEngine::from_bytes(&twice).unwrap();
    assert_eq!(
        engine.variant(),
        "native/fp32+pruned(l1=0.30,channels=0.00;l1=0.10,channels=0.50)"
    );

    let err = prune_bytes(
        &original,
        &PruneOptions {
            sparsity: 1.0,
            channels: 0.0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--sparsity"), "{err}");

    // The GRU model is outside the family: its conv's channels reach a GRU,
    // which the pruner cannot shrink, and it says so.
    let gru = model("fixtures/models/unsupported/model.onnx");
    let err = prune_bytes(
        &gru,
        &PruneOptions {
            sparsity: 0.0,
            channels: 0.25,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("GRU node"), "{err}");
    assert!(prune_bytes(b"not onnx", &PruneOptions::default()).is_err());
}

/// `true` when ONNX Runtime is usable; otherwise reports the skip (or
/// fails, when TICKSERVE_REQUIRE_ORT is set).
fn onnxruntime_or_skip(test: &str) -> bool {
    let required = std::env::var_os("TICKSERVE_REQUIRE_ORT").is_some();
    tickserve_test_support::available_or_skip(test, tickserve_engine_ort::is_available(), required)
}

#[test]
fn pruned_models_run_the_same_in_onnxruntime_and_the_native_engine() {
    if !onnxruntime_or_skip("pruned_models_run_the_same_in_onnxruntime_and_the_native_engine") {
        return;
    }
    let dir = tickserve_test_support::fresh_dir("tickserve-prune-ort");
    for arch in &ARCHS {
        let (pruned, report) = prune_bytes(
            &model(arch.model),
            &PruneOptions {
                sparsity: 0.3,
                channels: 0.25,
            },
        )
        .unwrap();
        let path = dir.join(format!("{}.onnx", arch.fixture));
        std::fs::write(&path, &pruned).unwrap();
        let ort = OrtEngine::load(&path, 1, 1).unwrap();
        let native = NativeEngine::from_bytes(&pruned).unwrap();
        assert_eq!(ort.signature(), native.signature());
        assert_eq!(
            ort.variant(),
            format!("onnxruntime+pruned({})", report.record)
        );
        let data = golden(arch.fixture);
        let diff = max_abs_diff(&run(&ort, &data), &run(&native, &data));
        assert!(
            diff <= 1e-5,
            "{}: native vs ONNX Runtime {diff}",
            arch.model
        );
        eprintln!(
            "{}: pruned, native vs ONNX Runtime max abs diff {diff:e}",
            arch.model
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
