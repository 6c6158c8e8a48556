//! The loaded models and the protocol-neutral inference path.
//!
//! crate::registry loads models into [`Model`]s of [`ModelVersion`]s and
//! swaps them in and out.
//!
//! [`ModelVersion`] validates a decoded request against the model's
//! signature and shapes the answer; crate::infer, the one path HTTP and
//! gRPC call, runs it between the two. The front ends only translate their
//! wire formats into [`InferRequest`] and back from [`InferResponse`].

use std::collections::BTreeMap;
use std::sync::Arc;

use tickserve_engine::{DataType, Signature, TensorSpec};
use tickserve_repository::ModelCacheConfig;
use tickserve_scheduler::{InferOptions, Priority, Scheduler};

use crate::error::ServeError;
use crate::stream_store::StreamStore;
use crate::version_stats::{CacheStats, TritonStats};

/// One decoded input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

/// A request as every protocol front end hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<InputTensor>,
    /// Outputs to return; `None` means all of them.
    pub outputs: Option<Vec<String>>,
    /// Priority and timeout (crate::scheduling::resolve_options).
    pub options: InferOptions,
    /// The request's `parameters` object (the result cache reads `cache`
    /// and keys on the others; see crate::cached).
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// One output tensor of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub outputs: Vec<OutputTensor>,
}

/// One loaded, warmed-up model version and its scheduler.
#[derive(Debug)]
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub engine_kind: &'static str,
    /// Engine plus numeric variant (`"native/int8"`): differs whenever
    /// outputs may differ, so response caches must key on it.
    pub engine_variant: String,
    pub signature: Signature,
    pub max_batch_size: usize,
    /// Batching settings, reported by Triton's model-configuration extension.
    pub max_queue_delay: std::time::Duration,
    pub instances: usize,
    /// The `[cache]` section of the model's config.toml.
    pub cache: ModelCacheConfig,
    pub(crate) scheduler: Scheduler,
    /// Triton's statistics of requests the cache answers without the queue.
    pub(crate) cache_stats: CacheStats,
    /// The streams' windows (crate::streams); `None` when the `[stream]`
    /// table turns them off or the model has not one input of shape
    /// [T, F].
    pub(crate) streams: Option<StreamStore>,
}

/// The served versions of one model. Immutable: a reload builds a new
/// `Model` and swaps it in (crate::registry).
#[derive(Debug)]
pub struct Model {
    pub name: String,
    /// Ascending by version number.
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
}

impl Model {
    /// The version a request names, or the latest when it names none. The
    /// caller's clone keeps the version (and its scheduler) alive until
    /// the request is answered, even if a swap replaces it meanwhile.
    pub fn version(&self, version: Option<&str>) -> Result<Arc<ModelVersion>, ServeError> {
        let found = match version {
            None => self.versions.values().next_back(),
            Some(v) => v.parse::<u64>().ok().and_then(|n| self.versions.get(&n)),
        };
        found.cloned().ok_or_else(|| ServeError::VersionNotFound {
            model: self.name.clone(),
            version: version.unwrap_or("").to_owned(),
            available: self.version_names().join(", "),
        })
    }

    pub fn version_names(&self) -> Vec<String> {
        self.versions.keys().map(u64::to_string).collect()
    }
}

impl ModelVersion {
    /// Whether requests of `priority` are background work: their class
    /// has no `target_latency`.
    pub(crate) fn is_background(&self, priority: Priority) -> bool {
        self.scheduler
            .config()
            .class(priority)
            .target_latency
            .is_none()
    }

    /// Class of a request that names none.
    pub fn default_priority(&self) -> Priority {
        self.scheduler.config().default_priority
    }

    /// Triton's statistics: the scheduler's counters and the cache's.
    pub fn stats(&self) -> TritonStats {
        self.cache_stats.merge(self.scheduler.stats())
    }

    /// The cache step's share of the statistics (crate::cached).
    pub(crate) fn cache_stats(&self) -> &CacheStats {
        &self.cache_stats
    }

    /// The streams' windows, when this version keeps streams.
    pub(crate) fn streams(&self) -> Option<&StreamStore> {
        self.streams.as_ref()
    }

    /// The scheduler, for the inference path (crate::infer).
    pub(crate) fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Shapes `rows` rows of every output (signature order) into the
    /// answer, keeping the `wanted` outputs.
    pub(crate) fn respond(
        &self,
        id: Option<String>,
        rows: usize,
        wanted: &[usize],
        mut outputs: Vec<Vec<f32>>,
    ) -> InferResponse {
        let tensors = wanted
            .iter()
            .map(|&index| {
                let spec = &self.signature.outputs[index];
                let mut shape = Vec::with_capacity(spec.dims.len() + 1);
                shape.push(rows);
                shape.extend_from_slice(&spec.dims);
                OutputTensor {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    shape,
                    data: std::mem::take(&mut outputs[index]),
                }
            })
            .collect();
        InferResponse {
            model_name: self.name.clone(),
            model_version: self.version.to_string(),
            id,
            outputs: tensors,
        }
    }

    /// Checks names, datatypes, shapes, counts and values of every input
    /// and returns the row count and, for each input of the signature, the
    /// index of the request's tensor that feeds it.
    pub(crate) fn validate(
        &self,
        request: &InferRequest,
    ) -> Result<(usize, Vec<usize>), ServeError> {
        let invalid = |m: String| Err(ServeError::Invalid(m));
        if request.inputs.is_empty() {
            return invalid("the request has no inputs".into());
        }
        for (i, input) in request.inputs.iter().enumerate() {
            if !self.signature.inputs.iter().any(|s| s.name == input.name) {
                return invalid(format!(
                    "unknown input '{}'; model '{}' takes {}",
                    input.name,
                    self.name,
                    names(&self.signature.inputs)
                ));
            }
            if request.inputs[..i]
                .iter()
                .any(|other| other.name == input.name)
            {
                return invalid(format!("input '{}' is given twice", input.name));
            }
        }
        let mut rows = None;
        let mut ordered = Vec::with_capacity(self.signature.inputs.len());
        for spec in &self.signature.inputs {
            let Some(index) = request.inputs.iter().position(|i| i.name == spec.name) else {
                return invalid(format!("input '{}' is missing", spec.name));
            };
            let input = &request.inputs[index];
            if input.datatype != spec.datatype.as_str() {
                return invalid(format!(
                    "input '{}' has datatype {}; the model takes {}",
                    spec.name, input.datatype, spec.datatype
                ));
            }
            let expected_shape = format!("[n, {}]", join(&spec.dims));
            let row_shape_ok = input.shape.len() == spec.dims.len() + 1
                && input.shape[1..]
                    .iter()
                    .zip(&spec.dims)
                    .all(|(&got, &want)| got >= 0 && got as usize == want);
            if !row_shape_ok {
                return invalid(format!(
                    "input '{}' has shape {:?}; the model takes {expected_shape} with n the batch size",
                    spec.name, input.shape
                ));
            }
            let n = input.shape[0];
            if n < 1 {
                return invalid(format!(
                    "input '{}' has batch size {n}; it must be at least 1",
                    spec.name
                ));
            }
            let n = n as usize;
            if n > self.max_batch_size {
                return invalid(format!(
                    "input '{}' has batch size {n}, more than the model's max_batch_size {}",
                    spec.name, self.max_batch_size
                ));
            }
            if let Some(previous) = rows
                && previous != n
            {
                return invalid(format!(
                    "inputs disagree on the batch size ({previous} vs {n} for '{}')",
                    spec.name
                ));
            }
            rows = Some(n);
            let expected = n * spec.row_len();
            if input.data.len() != expected {
                return invalid(format!(
                    "input '{}' has {} values; shape {:?} needs {expected}",
                    spec.name,
                    input.data.len(),
                    input.shape
                ));
            }
            if let Some(position) = input.data.iter().position(|v| !v.is_finite()) {
                return invalid(format!(
                    "input '{}' has a non-finite value at position {position} (NaN, infinity or out of FP32 range)",
                    spec.name
                ));
            }
            ordered.push(index);
        }
        Ok((rows.unwrap_or(1), ordered))
    }

    pub(crate) fn requested_outputs(
        &self,
        requested: Option<&[String]>,
    ) -> Result<Vec<usize>, ServeError> {
        let Some(requested) = requested.filter(|r| !r.is_empty()) else {
            return Ok((0..self.signature.outputs.len()).collect());
        };
        requested
            .iter()
            .map(|name| {
                self.signature
                    .outputs
                    .iter()
                    .position(|s| &s.name == name)
                    .ok_or_else(|| {
                        ServeError::Invalid(format!(
                            "unknown output '{name}'; model '{}' gives {}",
                            self.name,
                            names(&self.signature.outputs)
                        ))
                    })
            })
            .collect()
    }
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("'{}'", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
