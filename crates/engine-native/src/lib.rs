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
//! scheduler decides which threads call it. With intra-op threads
//! ([`NativeEngine::with_threads`]) the caller splits the batch with the
//! engine's own helper threads, which live as long as the engine; a share
//! no helper has taken by the time the caller is free, the caller runs
//! itself (`offer.rs`), so a call never waits for a helper to wake.
//!
//! Reduced precision ([`quant`]): bf16 and int8 GEMMs, int8 activation
//! scales dynamic, static ([`calibrate`]: fixed at load from a calibration
//! set) or a QDQ model's own (the recogniser reads them).

mod calibrate;
mod kernels;
mod model;
mod offer;
mod onnx;
mod quant;
mod recognise;
mod weights;

use std::path::Path;

use prost::Message;
use tickserve_engine::{
    Batch, BatchOutput, DataType, Engine, EngineError, Signature, TensorSpec, check_batch,
};

use std::sync::Mutex;

pub use crate::calibrate::{Calibration, CalibrationError, CalibrationMethod};
pub use crate::kernels::{Simd, available_simd, detect_simd};
use crate::model::{Ctx, HandOff, Plan, SeqLayer};
use crate::offer::{Job, Spin, run_offering};
pub use crate::quant::Precision;
pub use crate::weights::{ConvWeights, LinearWeights, LstmWeights, ModelWeights, SeqWeights};

/// How long helper threads spin after a call unless
/// [`NativeEngine::with_helper_spin`] says otherwise: longer than the idle
/// gaps between a busy server's calls, short enough that an idle engine
/// stops using the cores within milliseconds.
pub const DEFAULT_HELPER_SPIN: std::time::Duration = std::time::Duration::from_millis(2);

/// A CNN+LSTM model loaded from ONNX, runnable at any batch size.
#[derive(Debug)]
pub struct NativeEngine {
    signature: Signature,
    plan: Plan,
    /// Threads one batch is split across (rows divided evenly).
    threads: usize,
    /// The `threads − 1` helpers that run the other parts of a split
    /// batch while the caller runs the first. They are started once:
    /// spawning them per call cost ~270 µs per call on the 2-vCPU
    /// development VM (waking an idle vCPU for a new thread), 5 % of a
    /// batch-32 call (docs/engines.md).
    helpers: Option<rayon::ThreadPool>,
    /// How the helpers stay awake between calls ([`Self::with_helper_spin`]).
    spin: Spin,
    /// Where int8 activation scales come from (meaningful at int8 only).
    activations: Int8Activations,
    /// Idle forward-pass workspaces. Each worker (the calling thread and
    /// each split helper) takes one for the call and puts it back, so
    /// after warm-up a call allocates nothing but its output; the pool
    /// grows to the largest number of workers ever running at once.
    pool: Mutex<Vec<Ctx>>,
    /// What `tickserve model prune` did to the model, from its metadata
    /// (`tickserve_engine::PRUNING_METADATA_KEY`); part of the variant.
    pruning: Option<String>,
}

/// Where an int8 plan's activation scales and zero points come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Int8Activations {
    /// Each row's own range, at run time.
    Dynamic,
    /// Fixed at load from a calibration set ([`NativeEngine::with_static_int8`]).
    Static,
    /// The model's own QuantizeLinear/DequantizeLinear pairs.
    Qdq,
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
        // The recogniser returns an int8 plan only for QDQ models.
        let activations = if plan.precision == Precision::Int8 {
            Int8Activations::Qdq
        } else {
            Int8Activations::Dynamic
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
            helpers: None,
            spin: Spin::new(DEFAULT_HELPER_SPIN),
            activations,
            pool: Mutex::new(Vec::new()),
            pruning,
        })
    }

    /// Splits each batch of two or more rows across `threads` threads: the
    /// calling thread and `threads − 1` helper threads. The helpers are
    /// started here, `threads − 1` for each of `concurrent_calls` callers
    /// (the scheduler's engine instances), so calls made at the same time
    /// never queue for each other's helpers; they live until the engine is
    /// dropped. A batch of one row has no rows to split: when the model
    /// ends in two fp32 LSTM layers, the caller and one helper run it as a
    /// two-stage pipeline over time steps (`model::pipeline`); otherwise it
    /// runs on the calling thread.
    ///
    /// # Errors
    /// [`EngineError::Execution`] if the operating system refuses to start
    /// the helper threads.
    pub fn with_threads(
        mut self,
        threads: usize,
        concurrent_calls: usize,
    ) -> Result<Self, EngineError> {
        self.threads = threads.max(1);
        self.helpers = if self.threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads((self.threads - 1) * concurrent_calls.max(1))
                .thread_name(|i| format!("tickserve-engine-helper-{i}"))
                .build()
                .map_err(|e| {
                    EngineError::Execution(format!("cannot start the engine's helper threads: {e}"))
                })?;
            Some(pool)
        } else {
            None
        };
        Ok(self)
    }

    /// How long the helper threads keep spinning after a call, so that the
    /// next call finds them awake (default [`DEFAULT_HELPER_SPIN`]; zero
    /// parks them at once). Only engines with `threads > 1` have helpers.
    ///
    /// A parked helper can take longer to wake than a one-row call takes:
    /// on the 2-vCPU development VM, after 1 ms idle, a median ~0.5 ms
    /// (`--example idle_gaps`). Spinning costs a core's time while no call
    /// comes, as ONNX Runtime's intra-op spinning does.
    pub fn with_helper_spin(mut self, spin: std::time::Duration) -> Self {
        self.spin = Spin::new(spin);
        self
    }

    /// Runs the model's GEMMs in `precision` (see [`Precision`]): the
    /// weights are converted once, here; the ONNX file stays fp32. int8
    /// is dynamic (activation scales per row at run time).
    ///
    /// A QDQ model carries its own quantisation and keeps it: use
    /// [`Self::is_qdq`] to refuse a conflicting configuration.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        if self.activations != Int8Activations::Qdq {
            self.plan.set_precision(precision);
            self.activations = Int8Activations::Dynamic;
        }
        self
    }

    /// Runs the GEMMs in static int8: weights as [`Precision::Int8`],
    /// activations with one scale and zero point per GEMM input fixed
    /// from `calibration` (values outside the calibrated range saturate).
    ///
    /// # Errors
    /// If the calibration inputs do not have the model's input shape, hold
    /// non-finite values, or the percentile is outside [50, 100]; or the
    /// model is a QDQ model (it has its own scales).
    pub fn with_static_int8(mut self, calibration: &Calibration) -> Result<Self, EngineError> {
        if self.activations == Int8Activations::Qdq {
            return Err(EngineError::Unsupported(
                "a QDQ model carries its own activation scales; static calibration does not apply"
                    .into(),
            ));
        }
        calibrate::calibrate(&mut self.plan, calibration)
            .map_err(|e| EngineError::Unsupported(format!("static int8: {e}")))?;
        self.activations = Int8Activations::Static;
        Ok(self)
    }

    /// Whether the model carries QuantizeLinear/DequantizeLinear pairs
    /// (its int8 layers then run with the model's own scales).
    pub fn is_qdq(&self) -> bool {
        self.activations == Int8Activations::Qdq
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

    /// Runs the fp32 kernels at `simd` instead of the best level the CPU
    /// has (tests run every level; the recurrent weights are repacked).
    pub fn with_simd(mut self, simd: Simd) -> Result<Self, EngineError> {
        if !available_simd().contains(&simd) {
            return Err(EngineError::Unsupported(format!(
                "this CPU cannot run the {simd:?} kernels"
            )));
        }
        self.plan.set_simd(simd);
        Ok(self)
    }

    /// The SIMD level the fp32 kernels run at.
    pub fn simd(&self) -> Simd {
        self.plan.simd()
    }

    /// Runs `rows` rows of `input` (`rows × time_steps × features`) and
    /// writes `rows × output_width` values to `output`. With one thread,
    /// a call allocates nothing once a call of at least this many rows
    /// has run (the workspaces are reused); with several, handing each
    /// helper its part allocates a small job record.
    pub fn infer_into(
        &self,
        rows: usize,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), EngineError> {
        let row_len = self.plan.time_steps * self.plan.features;
        let width = self.plan.output_width;
        if input.len() != rows * row_len || output.len() != rows * width {
            return Err(EngineError::Execution(format!(
                "{rows} rows need {} input and {} output values, got {} and {}",
                rows * row_len,
                rows * width,
                input.len(),
                output.len()
            )));
        }
        let threads = self.threads.min(rows);
        let helpers = match (&self.helpers, self.plan.pipeline_cut()) {
            (Some(helpers), _) if threads > 1 => helpers,
            (Some(helpers), Some(cut)) if rows == 1 => {
                return self.infer_one_row_pipelined(helpers, cut, input, output);
            }
            _ => {
                self.with_ctx(|ctx| self.plan.forward_into(ctx, rows, input, output));
                return Ok(());
            }
        };
        // Each thread's share is whole samples, rows divided evenly. A
        // row's result does not depend on the rows computed beside it
        // (`tests/batch_invariance.rs`), so the split changes no bit of
        // any answer.
        let first = rows / threads;
        let (first_out, mut output_rest) = output.split_at_mut(first * width);
        let mut input_rest = &input[first * row_len..];
        let mut jobs: Vec<Job<'_>> = Vec::with_capacity(threads - 1);
        for t in 1..threads {
            let n = rows * (t + 1) / threads - rows * t / threads;
            let (chunk_in, rest_in) = input_rest.split_at(n * row_len);
            let (chunk_out, rest_out) = std::mem::take(&mut output_rest).split_at_mut(n * width);
            input_rest = rest_in;
            output_rest = rest_out;
            jobs.push(Box::new(move || {
                self.with_ctx(|ctx| self.plan.forward_into(ctx, n, chunk_in, chunk_out));
            }));
        }
        // The caller takes its workspace before offering the other shares
        // and returns it after they are settled, so each worker gets the
        // same workspace call after call (still in its core's cache)
        // instead of whichever one a race left on top of the pool.
        let call = self.spin.call_starts();
        let ((), panicked) = self.with_ctx(|caller_ctx| {
            run_offering(helpers, jobs, || {
                self.plan
                    .forward_into(caller_ctx, first, &input[..first * row_len], first_out);
            })
        });
        self.spin.after(helpers, threads - 1, call);
        if panicked {
            return Err(EngineError::Execution("an engine thread panicked".into()));
        }
        Ok(())
    }

    /// One row on two threads (`model::pipeline`): the caller runs the
    /// sequence layers up to the last LSTM while the back half (most of the
    /// first layers' rows, then that LSTM and the head, a step behind) is
    /// offered to a helper. A helper that has not taken it by the time the
    /// caller's half is done never will: the caller runs it itself, so a
    /// busy or slow-to-wake helper costs no more than one thread would.
    fn infer_one_row_pipelined(
        &self,
        helpers: &rayon::ThreadPool,
        cut: usize,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), EngineError> {
        let call = self.spin.call_starts();
        let panicked = self.with_ctx(|front_ctx| {
            let mut buffers = std::mem::take(&mut front_ctx.handoff);
            let handoff = HandOff::new(&mut buffers, &self.plan, cut);
            let back: Job<'_> = Box::new(|| {
                self.with_ctx(|ctx| self.plan.forward_back(ctx, cut, input, &handoff, output));
            });
            let ((), panicked) = run_offering(helpers, vec![back], || {
                self.plan.forward_front(front_ctx, cut, input, &handoff);
            });
            front_ctx.handoff = buffers;
            panicked
        });
        self.spin.after(helpers, 1, call);
        if panicked {
            return Err(EngineError::Execution("an engine thread panicked".into()));
        }
        Ok(())
    }

    /// Runs `f` with a workspace from the pool (a new one when all are in
    /// use), then returns it to the pool.
    fn with_ctx<R>(&self, f: impl FnOnce(&mut Ctx) -> R) -> R {
        let taken = self.pool.lock().map_or(None, |mut pool| pool.pop());
        let mut ctx = taken.unwrap_or_else(Ctx::new);
        let result = f(&mut ctx);
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(ctx);
        }
        result
    }

    /// The recognised model as plain fp32 weights (for engines that run
    /// the family elsewhere, such as the CUDA engine).
    ///
    /// # Errors
    /// [`EngineError::Unsupported`] for a QDQ model.
    pub fn weights(&self) -> Result<ModelWeights, EngineError> {
        weights::export(&self.plan).map_err(EngineError::Unsupported)
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
        let base = match (self.plan.precision, self.activations) {
            (Precision::Int8, Int8Activations::Static) => "native/int8-static".into(),
            (Precision::Int8, Int8Activations::Qdq) => "native/int8-qdq".into(),
            (precision, _) => format!("native/{precision}"),
        };
        tickserve_engine::variant_with_pruning(&base, self.pruning())
    }

    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        check_batch(&self.signature, batch)?;
        let mut output = vec![0.0f32; batch.rows * self.plan.output_width];
        self.infer_into(batch.rows, &batch.inputs[0], &mut output)?;
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![output],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx")
    }

    #[test]
    fn a_busy_helper_leaves_the_one_row_pipeline_to_the_caller() {
        let single = NativeEngine::load(&reference_model()).unwrap();
        let engine = NativeEngine::load(&reference_model())
            .unwrap()
            .with_threads(2, 1)
            .unwrap();
        assert!(engine.plan.pipeline_cut().is_some());
        let input: Vec<f32> = (0..3000).map(|i| ((i as f32) * 0.013).sin()).collect();
        let mut expected = [0.0f32; 3];
        single.infer_into(1, &input, &mut expected).unwrap();
        // Occupy the only helper until after the call: the caller must run
        // the back half itself, and must not wait for the helper to start
        // (if it did, the call would never return).
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let helpers = engine.helpers.as_ref().unwrap();
        helpers.spawn(move || {
            started.send(()).unwrap_or(());
            blocked.recv().unwrap_or(());
        });
        running.recv().unwrap();
        let mut got = [0.0f32; 3];
        engine.infer_into(1, &input, &mut got).unwrap();
        release.send(()).unwrap();
        assert_eq!(got.map(f32::to_bits), expected.map(f32::to_bits));
    }

    #[test]
    fn a_busy_helper_leaves_its_share_of_a_split_batch_to_the_caller() {
        let engine = NativeEngine::load(&reference_model())
            .unwrap()
            .with_threads(2, 1)
            .unwrap();
        let rows = 5;
        let input: Vec<f32> = (0..rows * 3000)
            .map(|i| ((i as f32) * 0.007).cos())
            .collect();
        let mut expected = vec![0.0f32; rows * 3];
        engine.infer_into(rows, &input, &mut expected).unwrap();
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        engine.helpers.as_ref().unwrap().spawn(move || {
            started.send(()).unwrap_or(());
            blocked.recv().unwrap_or(());
        });
        running.recv().unwrap();
        let mut got = vec![0.0f32; rows * 3];
        engine.infer_into(rows, &input, &mut got).unwrap();
        release.send(()).unwrap();
        // The same shares, run by the caller alone: the same bits.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&expected));
    }
}
