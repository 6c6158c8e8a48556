//! Golden checks on a real GPU. Without CUDA they print `SKIPPED … <reason>`
//! and pass, unless `TICKSERVE_REQUIRE_CUDA=1`, which makes them fail.

use std::path::Path;

use tickserve_engine::{Batch, Engine};
use tickserve_engine_cuda::{CudaEngine, CudaOptions, CudaPrecision, cuda_required, probe};

/// The repository root: `TICKSERVE_REPO_ROOT` when set (a test binary
/// carried to a GPU machine), else where this crate was built.
use tickserve_test_support::root;

/// `false` (after printing why) when the test must be skipped; fails
/// instead when TICKSERVE_REQUIRE_CUDA=1.
fn gpu_or_skip(test: &str) -> bool {
    tickserve_test_support::available_or_skip(test, probe(0), cuda_required())
}

fn npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("fixture");
    let file = npyz::NpyFile::new(&bytes[..]).expect("npy");
    let shape = file.shape().to_vec();
    (shape, file.into_vec::<f32>().expect("f32 npy"))
}

#[test]
fn golden_outputs_match_pytorch_at_every_precision() {
    if !gpu_or_skip("golden_outputs_match_pytorch_at_every_precision") {
        return;
    }
    let folder = root().join("fixtures/golden/cnn_lstm");
    let (shape, input) = npy(&folder.join("input.npy"));
    let (_, expected) = npy(&folder.join("output.npy"));
    for (precision, tolerance) in [
        (CudaPrecision::Fp32, 1e-4),
        (CudaPrecision::Tf32, 2e-2),
        (CudaPrecision::Bf16, 2e-2),
    ] {
        let options = CudaOptions {
            precision,
            max_batch_size: 64,
            ..CudaOptions::default()
        };
        let engine = CudaEngine::load(&root().join("models/cnn_lstm/1/model.onnx"), &options)
            .expect("the CUDA engine loads the reference model");
        let out = engine
            .infer(&Batch {
                rows: shape[0] as usize,
                inputs: vec![input.clone()],
            })
            .expect("inference");
        let worst = out.outputs[0]
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tolerance, "{precision}: max abs error {worst}");
    }
}
