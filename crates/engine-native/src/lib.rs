//! tickserve's own engine for the CNN+LSTM model family.
//!
//! Loading reads the ONNX file with a handful of hand-declared protobuf
//! messages ([`onnx`]), recognises the family in the graph
//! ([`recognise`]: Conv1d + ReLU blocks, transposes, forward LSTM layers,
//! the last time step, a Gemm + ReLU head) and lays the weights out for the
//! kernels ([`model`]). Anything outside the family is refused at load with
//! an error that names the first node it cannot run.
//!
//! Running a batch is plain synchronous code on the caller's thread; the
//! scheduler decides which threads call it.

mod kernels;
mod model;
mod onnx;
mod quant;
mod recognise;

use std::path::Path;

use prost::Message;
use tickserve_engine::{
    Batch, BatchOutput, DataType, Engine, EngineError, Signature, TensorSpec, check_batch,
};

use crate::model::{Plan, SeqLayer};
pub use crate::quant::Precision;

/// A CNN+LSTM model loaded from ONNX, runnable at any batch size.
#[derive(Debug)]
pub struct NativeEngine {
    signature: Signature,
    plan: Plan,
    /// Threads one batch is split across (rows divided evenly).
    threads: usize,
    /// What `tickserve model prune` did to the model, from its metadata
    /// (`tickserve_engine::PRUNING_METADATA_KEY`); part of the variant.
    pruning: Option<String>,
}

/// A one-line summary of what the recogniser found, for logs and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Architecture {
    pub conv_layers: usize,
    pub lstm_layers: usize,
    pub head_layers: usize,
    /// Multiply-adds per sample, ×2: the model's FLOPs per row.
    pub flops_per_row: u64,
}

impl NativeEngine {
    /// Loads and recognises the ONNX model at `path`.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            EngineError::Unreadable { reason, .. } => EngineError::Unreadable {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Loads a model from the bytes of an ONNX file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EngineError> {
        let model = onnx::ModelProto::decode(bytes).map_err(|e| EngineError::Unreadable {
            path: String::from("<bytes>"),
            reason: format!("not an ONNX model: {e}"),
        })?;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| EngineError::Unreadable {
                path: String::from("<bytes>"),
                reason: "the ONNX model has no graph".into(),
            })?;
        let plan = recognise::recognise(graph).map_err(EngineError::Unsupported)?;
        let name_of = |v: &onnx::ValueInfoProto| v.name.clone().unwrap_or_default();
        let input = graph
            .input
            .iter()
            .find(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .map(name_of)
            .unwrap_or_default();
        let output = graph.output.first().map(name_of).unwrap_or_default();
        let signature = Signature {
            inputs: vec![TensorSpec {
                name: input,
                datatype: DataType::Fp32,
                dims: vec![plan.time_steps, plan.features],
            }],
            outputs: vec![TensorSpec {
                name: output,
                datatype: DataType::Fp32,
                dims: vec![plan.output_width],
            }],
        };
        let pruning = model
            .metadata_props
            .iter()
            .find(|p| p.key.as_deref() == Some(tickserve_engine::PRUNING_METADATA_KEY))
            .and_then(|p| p.value.clone())
            .filter(|v| !v.is_empty());
        Ok(NativeEngine {
            signature,
            plan,
            threads: 1,
            pruning,
        })
    }

    /// Splits each batch of two or more rows across `threads` threads (the
    /// calling thread and `threads − 1` scoped helpers). A batch of one
    /// row always runs on the calling thread.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Runs the model's GEMMs in `precision` (see [`Precision`]): the
    /// weights are converted once, here; the ONNX file stays fp32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.plan.set_precision(precision);
        self
    }

    /// The precision the GEMMs run in.
    pub fn precision(&self) -> Precision {
        self.plan.precision
    }

    /// The pruning record of the model file (`"l1=0.30,channels=0.25"`),
    /// when `tickserve model prune` wrote it.
    pub fn pruning(&self) -> Option<&str> {
        self.pruning.as_deref()
    }

    /// Runs the rows split over the configured threads. Each thread runs
    /// whole samples; results differ from a single-threaded run only by the
    /// GEMM's summation order for a different row count (~1e-6).
    fn forward_split(&self, rows: usize, input: &[f32]) -> Result<Vec<f32>, EngineError> {
        let threads = self.threads.min(rows);
        if threads <= 1 {
            return Ok(self.plan.forward(rows, input));
        }
        let row_len = self.plan.time_steps * self.plan.features;
        let mut bounds = Vec::with_capacity(threads + 1);
        for t in 0..=threads {
            bounds.push(rows * t / threads);
        }
        std::thread::scope(|scope| {
            let helpers: Vec<_> = bounds[1..]
                .windows(2)
                .map(|w| {
                    let (start, end) = (w[0], w[1]);
                    let chunk = &input[start * row_len..end * row_len];
                    scope.spawn(move || self.plan.forward(end - start, chunk))
                })
                .collect();
            let mut output = self.plan.forward(bounds[1], &input[..bounds[1] * row_len]);
            for helper in helpers {
                let part = helper
                    .join()
                    .map_err(|_| EngineError::Execution("an engine thread panicked".into()))?;
                output.extend_from_slice(&part);
            }
            Ok(output)
        })
    }

    /// What the recogniser found in the graph.
    pub fn architecture(&self) -> Architecture {
        let mut time = self.plan.time_steps as u64;
        let mut flops = 0u64;
        let (mut conv_layers, mut lstm_layers) = (0, 0);
        for layer in &self.plan.seq {
            match layer {
                SeqLayer::Conv(c) => {
                    conv_layers += 1;
                    time = time + (c.pad_begin + c.pad_end) as u64 + 1 - c.kernel as u64;
                    flops += 2 * time * (c.kernel * c.in_channels * c.out_channels) as u64;
                }
                SeqLayer::Lstm(l) => {
                    lstm_layers += 1;
                    flops += 2 * time * (4 * l.hidden * (l.input + l.hidden)) as u64;
                }
            }
        }
        for linear in &self.plan.head {
            flops += 2 * (linear.input * linear.output) as u64;
        }
        Architecture {
            conv_layers,
            lstm_layers,
            head_layers: self.plan.head.len(),
            flops_per_row: flops,
        }
    }
}

impl Engine for NativeEngine {
    fn kind(&self) -> &'static str {
        "native"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn variant(&self) -> String {
        tickserve_engine::variant_with_pruning(
            &format!("native/{}", self.plan.precision),
            self.pruning(),
        )
    }

    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        check_batch(&self.signature, batch)?;
        let output = self.forward_split(batch.rows, &batch.inputs[0])?;
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![output],
        })
    }
}
