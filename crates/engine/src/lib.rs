//! The engine contract at the bottom of tickserve.
//!
//! An [`Engine`] turns one batch of input rows into one batch of output rows,
//! synchronously, on the calling thread. It knows nothing about requests,
//! queues, priorities or async runtimes: the scheduler above it merges
//! requests into a [`Batch`], calls [`Engine::infer`] on a dedicated OS thread
//! and splits the outputs back into per-request answers.
//!
//! Keeping this crate free of tokio (and of every other runtime) is what lets
//! engines be tested and benchmarked as plain functions, and lets the server
//! run them on threads of their own instead of the async executor.

use std::fmt;

/// Element type of a tensor, named as the Open Inference Protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    /// Every datatype in protocol order, for error messages that list them.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol's spelling (`"FP32"`, `"INT64"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses the protocol's spelling; `None` for anything else.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Name, element type and per-row shape (without the batch axis) of one
/// model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// Dimensions of one row; the batch axis is implied in front.
    pub dims: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements in one row.
    pub fn row_len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// What a loaded engine takes and gives, as the engine itself read it from
/// the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One engine call: `rows` rows of every input, each input's rows stored
/// contiguously in row-major order (`rows * spec.row_len()` f32 values,
/// in the order of [`Signature::inputs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub inputs: Vec<Vec<f32>>,
}

/// The answer to a [`Batch`]: for every output of the signature, `rows`
/// rows stored contiguously, in the order of [`Signature::outputs`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    pub rows: usize,
    pub outputs: Vec<Vec<f32>>,
}

/// Why an engine could not load a model or run a batch.
///
/// `Clone` so one failed batch can hand the same error to every request in it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// The model file could not be read or decoded.
    #[error("cannot read model {path}: {reason}")]
    Unreadable { path: String, reason: String },
    /// The model is valid but outside what this engine runs.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The batch handed to the engine does not fit its signature. The server
    /// validates requests before they are batched, so this is a bug upstream.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The engine failed while running a valid batch.
    #[error("engine failure: {0}")]
    Execution(String),
}

/// A loaded model, ready to run batches of any size from 1 to
/// [`Engine::max_batch_size`].
///
/// Implementations must be `Send + Sync`: the scheduler shares one engine
/// between its worker threads and calls [`Engine::infer`] from them
/// concurrently.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Short name of the implementation (`"native"`, `"onnxruntime"`), shown
    /// in model metadata and logs.
    fn kind(&self) -> &'static str;

    /// Inputs and outputs as read from the model.
    fn signature(&self) -> &Signature;

    /// What exactly runs the model, for metadata and cache keys: the
    /// engine kind plus anything that changes its numbers (precision,
    /// pruning). Outputs of two different variants may differ.
    fn variant(&self) -> String {
        self.kind().to_string()
    }

    /// Runs one batch. The batch must match [`Engine::signature`].
    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError>;

    /// Whether the engine can still serve; engines without failure modes of
    /// their own return `Ok(())`.
    fn health(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Checks that `batch` carries exactly the rows the signature asks for.
/// Engines call this first so a malformed batch fails loudly, not with an
/// out-of-bounds read.
pub fn check_batch(signature: &Signature, batch: &Batch) -> Result<(), EngineError> {
    if batch.rows == 0 {
        return Err(EngineError::InvalidBatch("batch has no rows".into()));
    }
    if batch.inputs.len() != signature.inputs.len() {
        return Err(EngineError::InvalidBatch(format!(
            "batch has {} inputs, model takes {}",
            batch.inputs.len(),
            signature.inputs.len()
        )));
    }
    for (spec, data) in signature.inputs.iter().zip(&batch.inputs) {
        let expected = batch.rows * spec.row_len();
        if data.len() != expected {
            return Err(EngineError::InvalidBatch(format!(
                "input '{}' has {} values, {} rows of {:?} need {expected}",
                spec.name,
                data.len(),
                batch.rows,
                spec.dims
            )));
        }
    }
    Ok(())
}

/// Key of the ONNX model metadata entry (`ModelProto.metadata_props`) in
/// which `tickserve model prune` records what it did to a model, e.g.
/// `"l1=0.30,channels=0.25"`. Engines append it to their
/// [`Engine::variant`] (see [`variant_with_pruning`]) so the metadata shows
/// it and cached results of a pruned model never answer for another.
pub const PRUNING_METADATA_KEY: &str = "tickserve.pruning";

/// `base` (`"native/fp32"`) followed by the model's pruning record, when it
/// has one: `"native/fp32+pruned(l1=0.30,channels=0.25)"`.
pub fn variant_with_pruning(base: &str, pruning: Option<&str>) -> String {
    match pruning {
        Some(record) if !record.is_empty() => format!("{base}+pruned({record})"),
        _ => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_round_trips_through_its_protocol_name() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("fp32"), None);
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn a_pruning_record_is_appended_to_the_variant() {
        assert_eq!(variant_with_pruning("native/int8", None), "native/int8");
        assert_eq!(variant_with_pruning("native/int8", Some("")), "native/int8");
        assert_eq!(
            variant_with_pruning("native/fp32", Some("l1=0.30,channels=0.25")),
            "native/fp32+pruned(l1=0.30,channels=0.25)"
        );
    }

    #[test]
    fn check_batch_counts_values_per_input() {
        let sig = Signature {
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                dims: vec![2, 3],
            }],
            outputs: vec![],
        };
        let ok = Batch {
            rows: 2,
            inputs: vec![vec![0.0; 12]],
        };
        assert!(check_batch(&sig, &ok).is_ok());
        let short = Batch {
            rows: 2,
            inputs: vec![vec![0.0; 11]],
        };
        assert!(matches!(
            check_batch(&sig, &short),
            Err(EngineError::InvalidBatch(_))
        ));
        let empty = Batch {
            rows: 0,
            inputs: vec![vec![]],
        };
        assert!(check_batch(&sig, &empty).is_err());
    }
}
