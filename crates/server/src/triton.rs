//! Triton's protocol extensions that its tools rely on, in a
//! protocol-neutral form shared by HTTP and gRPC: the model configuration
//! (perf_analyzer reads it before it sends anything), statistics and the
//! repository index (serving-systems.md §6).

use serde::Serialize;
use tickserve_engine::{DataType, TensorSpec};

use crate::error::ServeError;
use crate::models::{ModelRegistry, ModelVersion};
use crate::stats::StatsSnapshot;

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

/// Statistics of one version.
#[derive(Debug, Clone)]
pub struct VersionStats {
    pub name: String,
    pub version: String,
    pub stats: StatsSnapshot,
}

/// Statistics of every model, every version of one model, or one version.
pub fn statistics(
    registry: &ModelRegistry,
    model: Option<&str>,
    version: Option<&str>,
) -> Result<Vec<VersionStats>, ServeError> {
    let of = |v: &ModelVersion| VersionStats {
        name: v.name.clone(),
        version: v.version.to_string(),
        stats: v.stats.snapshot(),
    };
    match (model, version) {
        (None, _) => Ok(registry
            .models()
            .flat_map(|m| m.versions.values())
            .map(|v| of(v))
            .collect()),
        (Some(name), None) => Ok(registry
            .get(name)?
            .versions
            .values()
            .map(|v| of(v))
            .collect()),
        (Some(name), Some(version)) => Ok(vec![of(registry.get(name)?.version(Some(version))?)]),
    }
}

/// Triton's statistics JSON; `queue` is the time in the scheduler (see
/// [`crate::stats`]), the compute breakdown and cache statistics are zero.
pub fn statistics_json(stats: &[VersionStats]) -> serde_json::Value {
    let duration = |count: u64, ns: u64| serde_json::json!({ "count": count, "ns": ns });
    let zero = duration(0, 0);
    serde_json::json!({
        "model_stats": stats.iter().map(|v| serde_json::json!({
            "name": v.name,
            "version": v.version,
            "last_inference": v.stats.last_inference_ms,
            "inference_count": v.stats.inference_count,
            "execution_count": 0,
            "inference_stats": {
                "success": duration(v.stats.success_count, v.stats.success_ns),
                "fail": duration(v.stats.fail_count, v.stats.fail_ns),
                "queue": duration(v.stats.scheduled_count, v.stats.scheduled_ns),
                "compute_input": zero,
                "compute_infer": zero,
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [],
        })).collect::<Vec<_>>()
    })
}

/// `(model, version)` of every loaded version, all of them ready.
pub fn repository_index(registry: &ModelRegistry) -> Vec<(String, String)> {
    registry
        .models()
        .flat_map(|m| m.versions.values())
        .map(|v| (v.name.clone(), v.version.to_string()))
        .collect()
}
