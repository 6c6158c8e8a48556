//! Triton's protocol extensions that its tools rely on, in a
//! protocol-neutral form shared by HTTP and gRPC: the model configuration
//! (perf_analyzer reads it before it sends anything), statistics and the
//! repository index (serving-systems.md §6).

use std::sync::Arc;

use serde::Serialize;
use tickserve_engine::{DataType, TensorSpec};

use crate::error::ServeError;
use crate::models::{ModelRegistry, ModelVersion};

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
pub fn versions<'r>(
    registry: &'r ModelRegistry,
    model: Option<&str>,
    version: Option<&str>,
) -> Result<Vec<&'r Arc<ModelVersion>>, ServeError> {
    match (model, version) {
        (None, _) => Ok(registry
            .models()
            .flat_map(|m| m.versions.values())
            .collect()),
        (Some(name), None) => Ok(registry.get(name)?.versions.values().collect()),
        (Some(name), Some(version)) => Ok(vec![registry.get(name)?.version(Some(version))?]),
    }
}

/// `(model, version)` of every loaded version, all of them ready.
pub fn repository_index(registry: &ModelRegistry) -> Vec<(String, String)> {
    registry
        .models()
        .flat_map(|m| m.versions.values())
        .map(|v| (v.name.clone(), v.version.to_string()))
        .collect()
}
