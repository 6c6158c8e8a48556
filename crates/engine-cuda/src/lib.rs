//! tickserve's CUDA engine for the CNN+LSTM model family.
//!
//! The model is recognised by the native engine's recogniser
//! ([`NativeEngine::weights`]): the same family, the same refusals. On the
//! GPU, convolutions are im2col + one cuBLAS GEMM each, an LSTM layer's
//! input projection for all time steps is one GEMM, and the head is GEMMs.
//! The recurrence runs, on GPUs with thread-block clusters and up to
//! [`DEFAULT_CLUSTER_MAX_ROWS`] rows, as one cluster kernel per layer
//! whose blocks keep the recurrent weights in shared memory across every
//! time step; otherwise as one fused kernel per time step (recurrent
//! product, gates and cell update), or cuBLAS plus a cell kernel from
//! [`DEFAULT_STEP_GEMM_MIN_ROWS`] rows. Kernels are CUDA C compiled at
//! load by NVRTC.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading): building and
//! testing need no CUDA, and on a machine without it [`CudaEngine::load`]
//! fails with an error that names what is missing ([`probe`]).
//!
//! Each worker (one per concurrent caller, `instances`) has its own stream,
//! cuBLAS handle, buffers sized for the largest batch, pinned host buffers
//! and one CUDA graph per batch bucket (powers of two up to the maximum),
//! captured at load: a call is a copy in, one graph launch, a copy out. A
//! batch runs in the graph of the next bucket up; the extra rows are
//! padding whose outputs are dropped.

mod plan;
mod probe;
mod runtime;

use std::path::Path;
use std::sync::{Condvar, Mutex};

use tickserve_engine::{Batch, BatchOutput, Engine, EngineError, Signature, check_batch};
use tickserve_engine_native::NativeEngine;

pub use crate::plan::{
    BufferPlan, DEFAULT_GPU_MEMORY_FRACTION, FREE_MEMORY_MARGIN, MemoryBudget, batch_cap,
    bucket_for, graph_buckets,
};
pub use crate::probe::{Missing, probe};
use crate::runtime::{Device, Worker};

/// Numeric precision of the engine's GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CudaPrecision {
    /// Full fp32, TF32 off: matches PyTorch fp32.
    #[default]
    Fp32,
    /// fp32 storage, GEMMs on TF32 tensor cores (PyTorch's
    /// `allow_tf32 = True`); the recurrent step stays fp32.
    Tf32,
    /// bf16 GEMM inputs and recurrent weights, fp32 accumulation; the
    /// first sequence layer and the last head layer stay fp32.
    Bf16,
}

impl CudaPrecision {
    pub const ALL: [CudaPrecision; 3] = [
        CudaPrecision::Fp32,
        CudaPrecision::Tf32,
        CudaPrecision::Bf16,
    ];

    /// The configuration spelling (`"fp32"`, `"tf32"`, `"bf16"`).
    pub fn as_str(self) -> &'static str {
        match self {
            CudaPrecision::Fp32 => "fp32",
            CudaPrecision::Tf32 => "tf32",
            CudaPrecision::Bf16 => "bf16",
        }
    }

    pub fn parse(name: &str) -> Option<CudaPrecision> {
        CudaPrecision::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for CudaPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to load a model on the GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    pub precision: CudaPrecision,
    /// Largest batch asked for; lowered to what fits in memory.
    pub max_batch_size: usize,
    /// Callers that may run at once (the scheduler's `instances`): one
    /// worker (stream, buffers, graphs) each.
    pub workers: usize,
    /// Fraction of the GPU's memory the engine's allocations stay under.
    pub gpu_memory_fraction: f64,
    /// Capture a CUDA graph per batch bucket at load (else every call
    /// launches its kernels one by one).
    pub graphs: bool,
    /// From this many rows, an LSTM time step is a cuBLAS GEMM plus the
    /// cell kernel instead of the fused step kernel
    /// ([`DEFAULT_STEP_GEMM_MIN_ROWS`]; `usize::MAX`: never).
    pub step_gemm_min_rows: usize,
    /// Batches up to this many rows run each LSTM layer as one cluster
    /// kernel (every time step in one launch, the recurrent weights in the
    /// shared memory of a thread-block cluster) when the GPU has clusters
    /// (compute capability 9.0 and up) and the layer fits
    /// ([`DEFAULT_CLUSTER_MAX_ROWS`]; 0: never).
    pub cluster_max_rows: usize,
}

/// Batch size from which a time step's recurrent product goes to cuBLAS
/// (tensor cores at tf32 and bf16) instead of the fused step kernel. On
/// the H200 (docs/gpu.md) cuBLAS was faster from batch 32 at every
/// precision (fp32 batch 32: 0.82 vs 1.09 ms) and even at batch 1;
/// sizes between were not measured.
pub const DEFAULT_STEP_GEMM_MIN_ROWS: usize = 32;

/// Batches up to this many rows run each LSTM layer as one cluster kernel,
/// where the GPU has clusters. On the H200 (docs/gpu.md) it was the
/// fastest at batches 1 and 32 at every precision (fp32: 0.26 ms against
/// 0.53 for a kernel per step, and 0.51 against 0.83 for cuBLAS steps)
/// and at 256 in fp32 and tf32 (1.17 against 1.34 ms); at 1024 cuBLAS
/// steps were faster (fp32 3.00 against 3.44 ms), and in bf16 already at
/// 256 (1.02 against 1.12 ms).
pub const DEFAULT_CLUSTER_MAX_ROWS: usize = 256;

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            precision: CudaPrecision::Fp32,
            max_batch_size: 32,
            workers: 1,
            gpu_memory_fraction: DEFAULT_GPU_MEMORY_FRACTION,
            graphs: true,
            step_gemm_min_rows: DEFAULT_STEP_GEMM_MIN_ROWS,
            cluster_max_rows: DEFAULT_CLUSTER_MAX_ROWS,
        }
    }
}

/// A CNN+LSTM model on a CUDA GPU.
#[derive(Debug)]
pub struct CudaEngine {
    signature: Signature,
    // Workers before the device: their streams and buffers go first.
    pool: Mutex<Vec<Worker>>,
    returned: Condvar,
    device: Device,
    max_batch_size: usize,
    precision: CudaPrecision,
    output_width: usize,
    row_len: usize,
    pruning: Option<String>,
}

impl CudaEngine {
    /// Loads and recognises the ONNX model at `path` and puts it on the GPU.
    ///
    /// # Errors
    /// [`EngineError::Unsupported`] naming what is missing when this
    /// machine has no CUDA driver, library or device (checked before
    /// anything else touches CUDA), or the model is outside the family;
    /// [`EngineError::Execution`] when the GPU fails while loading.
    pub fn load(path: &Path, options: &CudaOptions) -> Result<Self, EngineError> {
        probe(options.device)
            .map_err(|missing| EngineError::Unsupported(format!("CUDA engine: {missing}")))?;
        let native = NativeEngine::load(path)?;
        Self::from_native(&native, options)
    }

    /// Puts a model the native engine recognised on the GPU (call
    /// [`probe`] first: without CUDA, cudarc's loaders panic).
    pub fn from_native(native: &NativeEngine, options: &CudaOptions) -> Result<Self, EngineError> {
        let weights = native.weights()?;
        plan::check_supported(&weights).map_err(EngineError::Unsupported)?;
        let device = Device::new(
            options.device,
            &weights,
            options.precision,
            options.step_gemm_min_rows.max(1),
            options.cluster_max_rows,
        )
        .map_err(EngineError::Execution)?;
        let (free, total) = device.memory().map_err(EngineError::Execution)?;
        let buffers = BufferPlan::new(&weights);
        let workers = options.workers.max(1);
        let budget = MemoryBudget {
            free_bytes: free,
            total_bytes: total,
            fraction: options.gpu_memory_fraction,
            fixed_bytes: device.weight_bytes(),
            per_worker_bytes: plan::CUBLAS_WORKSPACE_BYTES,
            workers,
        };
        let max_batch_size = batch_cap(&budget, buffers.bytes_per_row(), options.max_batch_size)
            .map_err(EngineError::Unsupported)?;
        if max_batch_size < options.max_batch_size {
            tracing::warn!(
                asked = options.max_batch_size,
                fits = max_batch_size,
                "CUDA engine: max batch size lowered to what fits in GPU memory"
            );
        }
        let buckets = graph_buckets(max_batch_size);
        let mut pool = Vec::with_capacity(workers);
        for _ in 0..workers {
            let mut worker = device
                .worker(max_batch_size)
                .map_err(EngineError::Execution)?;
            if options.graphs {
                device
                    .capture(&mut worker, &buckets)
                    .map_err(EngineError::Execution)?;
            }
            pool.push(worker);
        }
        tracing::info!(
            gpu = device.name(),
            device = options.device,
            precision = %options.precision,
            max_batch_size,
            workers,
            graphs = pool.first().map_or(0, Worker::graphs),
            lstm = if device.has_clusters() && options.cluster_max_rows > 0 {
                "cluster kernel per layer"
            } else {
                "kernel per time step"
            },
            "CUDA engine ready"
        );
        let signature = tickserve_engine::Engine::signature(native).clone();
        Ok(CudaEngine {
            row_len: weights.time_steps * weights.features,
            output_width: weights.output_width,
            signature,
            pool: Mutex::new(pool),
            returned: Condvar::new(),
            device,
            max_batch_size,
            precision: options.precision,
            pruning: native.pruning().map(str::to_string),
        })
    }

    /// The largest batch one call runs at once (what fits in memory, at
    /// most what was asked); larger batches are run in parts.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// Whether LSTM layers can run as one cluster kernel each on this GPU
    /// (compute capability 9.0 and up, the kernels compiled).
    pub fn uses_clusters(&self) -> bool {
        self.device.has_clusters()
    }

    pub fn precision(&self) -> CudaPrecision {
        self.precision
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// Runs `rows` rows of `input` into `output` (`rows × output_width`).
    pub fn infer_into(
        &self,
        rows: usize,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), EngineError> {
        if input.len() != rows * self.row_len || output.len() != rows * self.output_width {
            return Err(EngineError::Execution(format!(
                "{rows} rows need {} input and {} output values, got {} and {}",
                rows * self.row_len,
                rows * self.output_width,
                input.len(),
                output.len()
            )));
        }
        let mut worker = self.take_worker()?;
        let mut result = Ok(());
        for (chunk_in, chunk_out) in input
            .chunks(self.max_batch_size * self.row_len)
            .zip(output.chunks_mut(self.max_batch_size * self.output_width))
        {
            let n = chunk_in.len() / self.row_len;
            result = self
                .device
                .run(&mut worker, n, chunk_in, chunk_out)
                .map_err(EngineError::Execution);
            if result.is_err() {
                break;
            }
        }
        self.put_worker(worker);
        result
    }

    fn take_worker(&self) -> Result<Worker, EngineError> {
        let poisoned = |_| EngineError::Execution("the CUDA worker pool is poisoned".into());
        let mut pool = self.pool.lock().map_err(poisoned)?;
        loop {
            if let Some(worker) = pool.pop() {
                return Ok(worker);
            }
            pool = self.returned.wait(pool).map_err(poisoned)?;
        }
    }

    fn put_worker(&self, worker: Worker) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(worker);
        }
        self.returned.notify_one();
    }
}

impl Engine for CudaEngine {
    fn kind(&self) -> &'static str {
        "cuda"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn variant(&self) -> String {
        tickserve_engine::variant_with_pruning(
            &format!("cuda/{}", self.precision),
            self.pruning.as_deref(),
        )
    }

    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        check_batch(&self.signature, batch)?;
        let mut output = vec![0.0f32; batch.rows * self.output_width];
        self.infer_into(batch.rows, &batch.inputs[0], &mut output)?;
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![output],
        })
    }
}

/// Whether tests that need a GPU must fail instead of skipping
/// (`TICKSERVE_REQUIRE_CUDA=1`).
pub fn cuda_required() -> bool {
    std::env::var("TICKSERVE_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_round_trip_through_their_names() {
        for p in CudaPrecision::ALL {
            assert_eq!(CudaPrecision::parse(p.as_str()), Some(p));
        }
        assert_eq!(CudaPrecision::parse("int8"), None);
    }

    #[test]
    fn without_cuda_loading_names_what_is_missing() {
        if probe(0).is_ok() {
            println!("SKIPPED without_cuda_loading_names_what_is_missing: this machine has CUDA");
            return;
        }
        let model =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
        let err = CudaEngine::load(&model, &CudaOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, EngineError::Unsupported(_)), "{text}");
        assert!(
            text.contains("libcuda.so")
                || text.contains("libcublas")
                || text.contains("libnvrtc")
                || text.contains("device"),
            "{text}"
        );
    }
}
