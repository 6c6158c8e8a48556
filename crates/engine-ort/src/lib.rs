//! ONNX Runtime as a tickserve engine, for every ONNX model the native
//! engine does not recognise.
//!
//! The library is not linked: it is loaded at run time from the file named
//! by `ORT_DYLIB_PATH` (the PyPI wheel `onnxruntime` ships one, see
//! engines.md), so the default build needs no system library and a machine
//! without ONNX Runtime simply reports it as unavailable.
//!
//! One session serves every batch size (the batch axis must be dynamic).
//! `Session::run` needs exclusive access, so the engine keeps one session
//! per engine worker and each call takes a free one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{Shape, TensorElementType, TensorRef, ValueType};
use tickserve_engine::{
    Batch, BatchOutput, DataType, Engine, EngineError, Signature, TensorSpec, check_batch,
};

/// Environment variable naming the ONNX Runtime shared library.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// The library path from `ORT_DYLIB_PATH`, when it names an existing file.
pub fn library_path() -> Result<PathBuf, String> {
    let Some(path) = std::env::var_os(DYLIB_ENV) else {
        return Err(format!(
            "ONNX Runtime is not available: set {DYLIB_ENV} to libonnxruntime.so (pip install onnxruntime ships it in onnxruntime/capi/)"
        ));
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!(
            "ONNX Runtime is not available: {DYLIB_ENV}={} is not a file",
            path.display()
        ));
    }
    Ok(path)
}

/// The process-wide ONNX Runtime environment, created on first use.
fn environment() -> Result<&'static Environment, EngineError> {
    static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            let path = library_path()?;
            ort::init_from(&path)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
                .with_name("tickserve")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| EngineError::Unsupported(e.clone()))
}

/// Whether ONNX Runtime can be used in this process.
pub fn is_available() -> Result<(), String> {
    environment().map(|_| ()).map_err(|e| e.to_string())
}

/// An ONNX model run by ONNX Runtime.
#[derive(Debug)]
pub struct OrtEngine {
    signature: Signature,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    /// The model's pruning record (`tickserve_engine::PRUNING_METADATA_KEY`
    /// in its metadata), part of the variant.
    pruning: Option<String>,
}

fn unsupported(path: &Path, why: impl std::fmt::Display) -> EngineError {
    EngineError::Unsupported(format!("{}: {why}", path.display()))
}

impl OrtEngine {
    /// Loads `path` into `sessions` sessions (one per engine worker), each
    /// with `threads` intra-op threads.
    pub fn load(path: &Path, threads: usize, sessions: usize) -> Result<Self, EngineError> {
        let environment = environment()?;
        let mut loaded = Vec::with_capacity(sessions.max(1));
        for _ in 0..sessions.max(1) {
            let session = Session::builder(environment)
                .and_then(|b| Ok(b.with_intra_threads(threads.max(1))?))
                .and_then(|b| Ok(b.with_inter_threads(1)?))
                .and_then(|mut b| b.commit_from_file(path))
                .map_err(|e| EngineError::Unreadable {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            loaded.push(session);
        }
        let first = &loaded[0];
        let specs = |outlets: &[ort::value::Outlet], kind: &str| {
            outlets
                .iter()
                .map(|outlet| tensor_spec(path, kind, outlet.name(), outlet.dtype()))
                .collect::<Result<Vec<_>, _>>()
        };
        let signature = Signature {
            inputs: specs(first.inputs(), "input")?,
            outputs: specs(first.outputs(), "output")?,
        };
        let pruning = first
            .metadata()
            .ok()
            .and_then(|m| m.custom(tickserve_engine::PRUNING_METADATA_KEY))
            .filter(|v| !v.is_empty());
        Ok(OrtEngine {
            signature,
            sessions: loaded.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
            pruning,
        })
    }
}

/// The per-row spec of a tensor whose first axis is the (dynamic) batch.
fn tensor_spec(
    path: &Path,
    kind: &str,
    name: &str,
    dtype: &ValueType,
) -> Result<TensorSpec, EngineError> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
        return Err(unsupported(
            path,
            format!("{kind} '{name}' is not a tensor"),
        ));
    };
    if *ty != TensorElementType::Float32 {
        return Err(unsupported(
            path,
            format!("{kind} '{name}' is {ty:?}; tickserve serves FP32 tensors"),
        ));
    }
    let dims: &[i64] = shape;
    let Some((_, rest)) = dims.split_first() else {
        return Err(unsupported(
            path,
            format!("{kind} '{name}' has no batch axis"),
        ));
    };
    let dims = rest
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            unsupported(
                path,
                format!(
                    "{kind} '{name}' has shape {dims:?}: only the first (batch) axis may be dynamic"
                ),
            )
        })?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype: DataType::Fp32,
        dims,
    })
}

impl Engine for OrtEngine {
    fn kind(&self) -> &'static str {
        "onnxruntime"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn variant(&self) -> String {
        tickserve_engine::variant_with_pruning(self.kind(), self.pruning.as_deref())
    }

    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        check_batch(&self.signature, batch)?;
        let execution = |e: ort::Error| EngineError::Execution(format!("ONNX Runtime: {e}"));
        // Take a free session; all busy (more callers than sessions) means
        // waiting for the one this caller's turn points at.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.sessions.len();
        let mut guard = (0..count)
            .find_map(|i| self.sessions[(start + i) % count].try_lock().ok())
            .map_or_else(|| self.sessions[start % count].lock(), Ok)
            .map_err(|_| {
                EngineError::Execution("an ONNX Runtime session panicked earlier".into())
            })?;
        let mut inputs = Vec::with_capacity(batch.inputs.len());
        for (spec, data) in self.signature.inputs.iter().zip(&batch.inputs) {
            let shape = Shape::new(
                std::iter::once(batch.rows as i64).chain(spec.dims.iter().map(|&d| d as i64)),
            );
            let tensor = TensorRef::from_array_view((shape, data.as_slice())).map_err(execution)?;
            inputs.push((spec.name.as_str(), tensor));
        }
        let outputs = guard.run(inputs).map_err(execution)?;
        let mut values = Vec::with_capacity(self.signature.outputs.len());
        for spec in &self.signature.outputs {
            let (_, data) = outputs[spec.name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(execution)?;
            if data.len() != batch.rows * spec.row_len() {
                return Err(EngineError::Execution(format!(
                    "ONNX Runtime returned {} values for output '{}', expected {}",
                    data.len(),
                    spec.name,
                    batch.rows * spec.row_len()
                )));
            }
            values.push(data.to_vec());
        }
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: values,
        })
    }
}
