//! The CUDA engine's checks on a GPU machine, driven by
//! `scripts/gpu-check.sh` (which carries this binary there: it needs no
//! Rust toolchain on the GPU machine).
//!
//! ```text
//! gpu_check golden  <repo root>            # every fixture model × precision vs PyTorch's outputs
//! gpu_check bench   <repo root> [seconds]  # reference model: batch 1/32/256/1024 per precision
//! gpu_check weights <repo root> <out dir>  # plain weights as JSON, for the PyTorch comparison
//! ```
//!
//! Every result is also printed as one `RESULT {json}` line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tickserve_engine_cuda::{CudaEngine, CudaOptions, CudaPrecision, probe};
use tickserve_engine_native::{NativeEngine, SeqWeights};

/// `(name, model file, golden folder)` relative to the repository root.
const FIXTURES: [(&str, &str, &str); 3] = [
    (
        "cnn_lstm",
        "models/cnn_lstm/1/model.onnx",
        "fixtures/golden/cnn_lstm",
    ),
    (
        "variant_a",
        "fixtures/models/variant_a/model.onnx",
        "fixtures/golden/variant_a",
    ),
    (
        "variant_b",
        "fixtures/models/variant_b/model.onnx",
        "fixtures/golden/variant_b",
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(args.get(1).map_or(".", String::as_str));
    let result = match args.first().map(String::as_str) {
        Some("golden") => golden(&root),
        Some("bench") => bench(
            &root,
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0),
        ),
        Some("weights") => weights(&root, Path::new(args.get(2).map_or(".", String::as_str))),
        _ => Err("usage: gpu_check golden|bench|weights <repo root> [...]".into()),
    };
    if let Err(e) = result {
        eprintln!("gpu_check: {e}");
        std::process::exit(1);
    }
}

fn read_npy(path: &Path) -> Result<(Vec<u64>, Vec<f32>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?;
    let shape = npy.shape().to_vec();
    let data = npy
        .into_vec::<f32>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((shape, data))
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// How an LSTM layer runs: a fused kernel per step, cuBLAS plus the cell
/// kernel per step, or one cluster kernel per layer (the default where
/// the GPU has clusters).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Steps {
    Fused,
    Cluster,
    Gemm,
}

impl Steps {
    fn min_rows(self) -> usize {
        match self {
            Steps::Fused | Steps::Cluster => usize::MAX,
            Steps::Gemm => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Steps::Fused => "fused",
            Steps::Cluster => "cluster",
            Steps::Gemm => "gemm",
        }
    }
}

fn load(
    path: &Path,
    precision: CudaPrecision,
    max_batch: usize,
    graphs: bool,
    steps: Steps,
) -> Result<CudaEngine, String> {
    let options = CudaOptions {
        precision,
        max_batch_size: max_batch,
        graphs,
        step_gemm_min_rows: steps.min_rows(),
        cluster_max_rows: if steps == Steps::Cluster {
            usize::MAX
        } else {
            0
        },
        ..CudaOptions::default()
    };
    let engine = CudaEngine::load(path, &options).map_err(|e| e.to_string())?;
    if steps == Steps::Cluster && !engine.uses_clusters() {
        return Err("the cluster kernels are unavailable on this GPU".into());
    }
    Ok(engine)
}

fn golden(root: &Path) -> Result<(), String> {
    probe(0).map_err(|m| m.to_string())?;
    let mut failures = 0;
    for (name, model, folder) in FIXTURES {
        let (shape, input) = read_npy(&root.join(folder).join("input.npy"))?;
        let (_, expected) = read_npy(&root.join(folder).join("output.npy"))?;
        let rows = shape[0] as usize;
        let row_len = input.len() / rows;
        let width = expected.len() / rows;
        for precision in CudaPrecision::ALL {
            for (graphs, steps) in [
                (true, Steps::Fused),
                (false, Steps::Fused),
                (true, Steps::Gemm),
                (true, Steps::Cluster),
                (false, Steps::Cluster),
            ] {
                if !graphs && precision != CudaPrecision::Fp32 {
                    continue;
                }
                let started = Instant::now();
                let engine = match load(&root.join(model), precision, 64, graphs, steps) {
                    Ok(e) => e,
                    Err(e) => {
                        failures += 1;
                        println!(
                            "RESULT {{\"check\":\"golden\",\"model\":\"{name}\",\"precision\":\"{precision}\",\"graphs\":{graphs},\"steps\":\"{}\",\"error\":{e:?}}}",
                            steps.name()
                        );
                        continue;
                    }
                };
                let load_ms = started.elapsed().as_secs_f64() * 1e3;
                // The whole golden batch at once, then row by row, then in
                // odd-sized parts (padding rows inside a bucket).
                let mut full = vec![0.0f32; expected.len()];
                let mut single = vec![0.0f32; expected.len()];
                let mut parts = vec![0.0f32; expected.len()];
                let run = (|| -> Result<(), String> {
                    engine
                        .infer_into(rows, &input, &mut full)
                        .map_err(|e| e.to_string())?;
                    for r in 0..rows {
                        engine
                            .infer_into(
                                1,
                                &input[r * row_len..(r + 1) * row_len],
                                &mut single[r * width..(r + 1) * width],
                            )
                            .map_err(|e| e.to_string())?;
                    }
                    let mut r = 0;
                    for n in [3usize, 5, 7].iter().cycle() {
                        if r >= rows {
                            break;
                        }
                        let n = (*n).min(rows - r);
                        engine
                            .infer_into(
                                n,
                                &input[r * row_len..(r + n) * row_len],
                                &mut parts[r * width..(r + n) * width],
                            )
                            .map_err(|e| e.to_string())?;
                        r += n;
                    }
                    Ok(())
                })();
                let (e_full, e_single, e_parts) = (
                    max_abs(&full, &expected),
                    max_abs(&single, &expected),
                    max_abs(&parts, &expected),
                );
                let worst = e_full.max(e_single).max(e_parts);
                let tolerance = match precision {
                    CudaPrecision::Fp32 => 1e-4,
                    CudaPrecision::Tf32 | CudaPrecision::Bf16 => 2e-2,
                };
                let pass = run.is_ok() && worst <= tolerance && worst.is_finite();
                if !pass {
                    failures += 1;
                }
                println!(
                    "RESULT {{\"check\":\"golden\",\"model\":\"{name}\",\"precision\":\"{precision}\",\"graphs\":{graphs},\"steps\":\"{}\",\"rows\":{rows},\"max_abs_full\":{e_full:e},\"max_abs_single\":{e_single:e},\"max_abs_parts\":{e_parts:e},\"tolerance\":{tolerance:e},\"pass\":{pass},\"load_ms\":{load_ms:.1},\"error\":{:?}}}",
                    steps.name(),
                    run.err().unwrap_or_default()
                );
                if !pass {
                    println!(
                        "  first row: got {:?} expected {:?}",
                        &full[..width],
                        &expected[..width]
                    );
                }
            }
        }
    }
    failures += usize::from(!from_threads(root)?);
    if failures > 0 {
        return Err(format!("{failures} golden checks failed"));
    }
    Ok(())
}

/// The reference model called from four threads at once through two
/// workers, as the scheduler's instances call it (the engine is loaded on
/// this thread; calls bind the context on theirs). Returns whether every
/// row matched the fixtures within 1e-4.
fn from_threads(root: &Path) -> Result<bool, String> {
    let folder = root.join("fixtures/golden/cnn_lstm");
    let (shape, input) = read_npy(&folder.join("input.npy"))?;
    let (_, expected) = read_npy(&folder.join("output.npy"))?;
    let rows = shape[0] as usize;
    let (row_len, width) = (input.len() / rows, expected.len() / rows);
    let options = CudaOptions {
        max_batch_size: 64,
        workers: 2,
        ..CudaOptions::default()
    };
    let engine = CudaEngine::load(&root.join("models/cnn_lstm/1/model.onnx"), &options)
        .map_err(|e| e.to_string())?;
    let worst = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (engine, input, expected) = (&engine, &input, &expected);
                scope.spawn(move || -> Result<f64, String> {
                    let mut worst = 0.0f64;
                    for r in (t..rows).step_by(4) {
                        let mut out = vec![0.0f32; width];
                        engine
                            .infer_into(1, &input[r * row_len..(r + 1) * row_len], &mut out)
                            .map_err(|e| e.to_string())?;
                        worst = worst.max(max_abs(&out, &expected[r * width..(r + 1) * width]));
                    }
                    Ok(worst)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a thread panicked".to_string())?)
            .try_fold(0.0f64, |acc, w| w.map(|w| acc.max(w)))
    });
    let (pass, detail) = match &worst {
        Ok(w) => (*w <= 1e-4, format!("\"max_abs\":{w:e}")),
        Err(e) => (false, format!("\"error\":{e:?}")),
    };
    println!(
        "RESULT {{\"check\":\"threads\",\"model\":\"cnn_lstm\",\"precision\":\"fp32\",\"threads\":4,\"workers\":2,{detail},\"pass\":{pass}}}"
    );
    Ok(pass)
}

fn bench(root: &Path, seconds: f64) -> Result<(), String> {
    probe(0).map_err(|m| m.to_string())?;
    let (_, golden) = read_npy(&root.join("fixtures/golden/cnn_lstm/input.npy"))?;
    let row_len = 50 * 60;
    let budget = Duration::from_secs_f64(seconds);
    for (precision, steps) in CudaPrecision::ALL
        .into_iter()
        .flat_map(|p| [(p, Steps::Fused), (p, Steps::Gemm), (p, Steps::Cluster)])
    {
        let engine = load(
            &root.join("models/cnn_lstm/1/model.onnx"),
            precision,
            1024,
            true,
            steps,
        )?;
        for batch in [1usize, 32, 256, 1024] {
            let input: Vec<f32> = (0..batch * row_len)
                .map(|i| golden[i % golden.len()])
                .collect();
            let mut output = vec![0.0f32; batch * 3];
            for _ in 0..10 {
                engine
                    .infer_into(batch, &input, &mut output)
                    .map_err(|e| e.to_string())?;
            }
            let mut times = Vec::new();
            let started = Instant::now();
            while started.elapsed() < budget || times.len() < 20 {
                let t = Instant::now();
                engine
                    .infer_into(batch, &input, &mut output)
                    .map_err(|e| e.to_string())?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if times.len() >= 20_000 {
                    break;
                }
            }
            times.sort_by(f64::total_cmp);
            let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            let median = p(0.5);
            println!(
                "RESULT {{\"check\":\"bench\",\"engine\":\"tickserve-cuda-{}\",\"precision\":\"{precision}\",\"batch\":{batch},\"calls\":{},\"p50_ms\":{median:.4},\"p99_ms\":{:.4},\"samples_per_s\":{:.0}}}",
                steps.name(),
                times.len(),
                p(0.99),
                batch as f64 / median * 1e3
            );
        }
    }
    Ok(())
}

/// Writes `<name>.json` per fixture model: the recognised layers with
/// their weights (native layouts, see `tickserve_engine_native::ModelWeights`).
fn weights(root: &Path, out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    for (name, model, _) in FIXTURES {
        let native = NativeEngine::load(&root.join(model)).map_err(|e| e.to_string())?;
        let w = native.weights().map_err(|e| e.to_string())?;
        let seq: Vec<serde_json::Value> = w
            .seq
            .iter()
            .map(|layer| match layer {
                SeqWeights::Conv(c) => serde_json::json!({"kind": "conv", "in": c.in_channels,
                    "out": c.out_channels, "kernel": c.kernel, "pad_begin": c.pad_begin,
                    "pad_end": c.pad_end, "taps": c.taps, "bias": c.bias, "relu": c.relu}),
                SeqWeights::Lstm(l) => serde_json::json!({"kind": "lstm", "in": l.input,
                    "hidden": l.hidden, "w_t": l.w_t, "r_t": l.r_t, "bias": l.bias}),
            })
            .collect();
        let head: Vec<serde_json::Value> = w
            .head
            .iter()
            .map(|l| serde_json::json!({"in": l.input, "out": l.output, "w_t": l.w_t, "bias": l.bias, "relu": l.relu}))
            .collect();
        let doc = serde_json::json!({"time_steps": w.time_steps, "features": w.features,
            "output_width": w.output_width, "seq": seq, "head": head});
        let path = out.join(format!("{name}.json"));
        std::fs::write(&path, doc.to_string()).map_err(|e| e.to_string())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
