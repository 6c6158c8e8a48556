//! The repository root and the golden fixtures: inputs PyTorch ran and the
//! outputs it computed, and the OIP request bodies built from them.

use std::path::{Path, PathBuf};

/// The repository root. `TICKSERVE_REPO_ROOT` overrides it, for a test
/// binary run away from its checkout (the GPU check bundle).
pub fn root() -> PathBuf {
    std::env::var_os("TICKSERVE_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// A float32 `.npy` file's shape and values.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    let values = npy
        .into_vec::<f32>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (shape, values)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

/// Values of one input row of the bundled model (50 steps × 60 features).
pub const ROW: usize = 50 * 60;

/// The bundled model's fixture: inputs, row after row, and PyTorch's
/// outputs (3 per row).
pub struct Golden {
    pub input: Vec<f32>,
    pub output: Vec<f32>,
}

pub fn golden() -> Golden {
    let dir = root().join("fixtures/golden/cnn_lstm");
    Golden {
        input: read_npy(&dir.join("input.npy")).1,
        output: read_npy(&dir.join("output.npy")).1,
    }
}

/// An OIP request body (JSON) for the golden rows `rows`.
pub fn request_for(golden: &Golden, rows: &[usize], id: &str) -> serde_json::Value {
    let mut data = Vec::with_capacity(rows.len() * ROW);
    for &r in rows {
        data.extend_from_slice(&golden.input[r * ROW..(r + 1) * ROW]);
    }
    serde_json::json!({
        "id": id,
        "inputs": [{"name": "input", "shape": [rows.len(), 50, 60], "datatype": "FP32", "data": data}]
    })
}

/// Asserts that `response` carries exactly the golden outputs of `rows`
/// (within the 1e-5 the engine promises against PyTorch).
pub fn assert_golden_rows(golden: &Golden, response: &serde_json::Value, rows: &[usize]) {
    let output = &response["outputs"][0];
    assert_eq!(output["name"], "output");
    assert_eq!(output["datatype"], "FP32");
    assert_eq!(output["shape"], serde_json::json!([rows.len(), 3]));
    let data: Vec<f64> = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(data.len(), rows.len() * 3);
    for (i, &r) in rows.iter().enumerate() {
        for j in 0..3 {
            let want = f64::from(golden.output[r * 3 + j]);
            let got = data[i * 3 + j];
            assert!(
                (got - want).abs() <= 1e-5,
                "row {i} (golden {r}) output {j}: {got} vs {want}"
            );
        }
    }
}

/// `len` deterministic, varied input values (a sine sweep): the engines'
/// work does not depend on values, but zeros or denormals could flatter
/// a measurement.
pub fn sine_input(len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i as f32) * 0.013).sin()).collect()
}

/// Whether a test that needs an optional runtime (ONNX Runtime, a GPU)
/// can run: `true` when `availability` is `Ok`; otherwise it prints
/// `SKIPPED {test}: {reason}` and returns `false`, or fails the test when
/// `required` (the environment asked for that runtime: a skip there would
/// hide a broken installation).
pub fn available_or_skip<E: std::fmt::Display>(
    test: &str,
    availability: Result<(), E>,
    required: bool,
) -> bool {
    match availability {
        Ok(()) => true,
        Err(reason) => {
            assert!(!required, "{test}: required here, but {reason}");
            println!("SKIPPED {test}: {reason}");
            false
        }
    }
}

/// The message of an error answer (`{"error": "…"}`); panics without one.
pub fn error_of(body: &serde_json::Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

/// The largest absolute difference between two outputs of equal length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A benchmark's time budget: `BENCH_SECONDS` when set, else
/// `default_seconds`.
pub fn bench_budget(default_seconds: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_seconds),
    )
}
