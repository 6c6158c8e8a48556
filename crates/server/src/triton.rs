//! Triton's protocol extensions that its tools rely on, in a
//! protocol-neutral form shared by HTTP and gRPC: the model configuration
//! (perf_analyzer reads it before it sends anything), statistics and the
//! repository index (serving-systems.md §6).
//!
//! Statistics come from two counters per version: the scheduler's (what
//! it queued and ran) and [`CacheStats`] (what the result cache answered
//! without the queue), merged into [`TritonStats`]. The HTTP body also
//! carries per-priority counts.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};
use tickserve_engine::{DataType, TensorSpec};
use tickserve_scheduler::stats::Timing;

use crate::error::ServeError;
use crate::models::ModelVersion;
use crate::registry::ModelRegistry;
pub use crate::version_stats::{TritonStats, TritonTotals};

/// Triton's `TYPE_*` name of a datatype (model_config.proto's `DataType`).
pub fn triton_type(datatype: DataType) -> &'static str {
    match datatype {
        DataType::Bool => "TYPE_BOOL",
        DataType::Uint8 => "TYPE_UINT8",
        DataType::Uint16 => "TYPE_UINT16",
        DataType::Uint32 => "TYPE_UINT32",
        DataType::Uint64 => "TYPE_UINT64",
        DataType::Int8 => "TYPE_INT8",
        DataType::Int16 => "TYPE_INT16",
        DataType::Int32 => "TYPE_INT32",
        DataType::Int64 => "TYPE_INT64",
        DataType::Fp16 => "TYPE_FP16",
        DataType::Bf16 => "TYPE_BF16",
        DataType::Fp32 => "TYPE_FP32",
        DataType::Fp64 => "TYPE_FP64",
        DataType::Bytes => "TYPE_STRING",
    }
}

/// A model version's configuration in Triton's JSON shape: dims without
/// the batch axis, the batch axis stated by `max_batch_size`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfigJson {
    pub name: String,
    pub platform: &'static str,
    pub backend: &'static str,
    pub max_batch_size: usize,
    pub input: Vec<InputConfigJson>,
    pub output: Vec<OutputConfigJson>,
    pub instance_group: Vec<InstanceGroupJson>,
    pub dynamic_batching: DynamicBatchingJson,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputConfigJson {
    pub name: String,
    pub data_type: &'static str,
    pub format: &'static str,
    pub dims: Vec<i64>,
    pub is_shape_tensor: bool,
    pub allow_ragged_batch: bool,
    pub optional: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputConfigJson {
    pub name: String,
    pub data_type: &'static str,
    pub dims: Vec<i64>,
    pub label_filename: &'static str,
    pub is_shape_tensor: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceGroupJson {
    pub name: String,
    pub kind: &'static str,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DynamicBatchingJson {
    pub preferred_batch_size: Vec<usize>,
    pub max_queue_delay_microseconds: u64,
}

fn dims(spec: &TensorSpec) -> Vec<i64> {
    spec.dims.iter().map(|&d| d as i64).collect()
}

impl ModelConfigJson {
    pub fn of(version: &ModelVersion) -> Self {
        ModelConfigJson {
            name: version.name.clone(),
            platform: "onnx",
            backend: version.engine_kind,
            max_batch_size: version.max_batch_size,
            input: version
                .signature
                .inputs
                .iter()
                .map(|s| InputConfigJson {
                    name: s.name.clone(),
                    data_type: triton_type(s.datatype),
                    format: "FORMAT_NONE",
                    dims: dims(s),
                    is_shape_tensor: false,
                    allow_ragged_batch: false,
                    optional: false,
                })
                .collect(),
            output: version
                .signature
                .outputs
                .iter()
                .map(|s| OutputConfigJson {
                    name: s.name.clone(),
                    data_type: triton_type(s.datatype),
                    dims: dims(s),
                    label_filename: "",
                    is_shape_tensor: false,
                })
                .collect(),
            instance_group: vec![InstanceGroupJson {
                name: version.name.clone(),
                kind: "KIND_CPU",
                count: version.instances,
            }],
            dynamic_batching: DynamicBatchingJson {
                preferred_batch_size: Vec::new(),
                max_queue_delay_microseconds: u64::try_from(version.max_queue_delay.as_micros())
                    .unwrap_or(u64::MAX),
            },
        }
    }
}

/// Every version of every model, every version of one model, or one
/// version: what a statistics request covers.
pub fn versions(
    registry: &ModelRegistry,
    model: Option<&str>,
    version: Option<&str>,
) -> Result<Vec<Arc<ModelVersion>>, ServeError> {
    match (model, version) {
        (None, _) => Ok(registry
            .models()
            .iter()
            .flat_map(|m| m.versions.values().cloned())
            .collect()),
        (Some(name), None) => Ok(registry.get(name)?.versions.values().cloned().collect()),
        (Some(name), Some(version)) => Ok(vec![registry.get(name)?.version(Some(version))?]),
    }
}

// === statistics ===

fn timing(t: Timing) -> Value {
    json!({ "count": t.count, "ns": t.ns })
}

/// One entry of `model_stats`.
pub fn model_stats(name: &str, version: u64, triton: &TritonStats) -> Value {
    let totals = TritonTotals::of(triton);
    let stats = &triton.scheduler;
    let classes = &stats.classes;
    json!({
        "name": name,
        "version": version.to_string(),
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": timing(totals.success),
            "fail": timing(totals.fail),
            "queue": timing(totals.queue),
            "compute_input": timing(totals.compute_input),
            "compute_infer": timing(totals.compute_infer),
            "compute_output": timing(totals.compute_output),
            "cache_hit": timing(totals.cache_hit),
            "cache_miss": timing(totals.cache_miss),
        },
        "batch_stats": stats.batches.iter().map(|b| json!({
            "batch_size": b.batch_size,
            "compute_input": timing(b.compute_input),
            "compute_infer": timing(b.compute_infer),
            "compute_output": timing(b.compute_output),
        })).collect::<Vec<_>>(),
        "priority_stats": classes.iter().map(|c| json!({
            "priority": c.priority.level(),
            "request_type": c.priority.name(),
            "success": timing(c.success),
            "fail": timing(c.fail),
            "queue": timing(c.queue),
            "compute_infer": timing(c.compute_infer),
            "rejected": {
                "queue_full": c.rejected_queue_full,
                "deadline": c.rejected_deadline,
            },
            "timeout_expired": c.expired,
        })).collect::<Vec<_>>(),
        "adaptive_batch_size": stats.live_batch_size,
    })
}
