//! Triton's `config.pbtxt`, so a Triton model repository serves unchanged.
//!
//! The file is protobuf text format of Triton's `inference.ModelConfig`.
//! It is parsed by a real text-format parser (prost-reflect) against the
//! schema in `proto/model_config.proto`, compiled to a descriptor set at
//! build time, so every syntax error, unknown field or unknown enum value
//! is refused with the parser's reason. The parsed message is then turned
//! into JSON with proto field names (only the fields the file sets) and:
//!
//! 1. read into the few Triton structures tickserve applies, which map
//!    onto [`ModelConfig`] (see docs/models.md for the table);
//! 2. walked for every field that is set but not applied, so the caller
//!    can list them in one warning instead of dropping them silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde::Deserialize;
use serde_json::Value;
use tickserve_engine::DataType;

use crate::config::{EngineChoice, ModelConfig, PriorityConfig, TensorConfig, VersionPolicy};
use crate::{MODEL_FILE, RepositoryError};

/// The descriptor set build.rs compiles from proto/model_config.proto.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/model_config.bin"));

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()));

/// Every field path (dotted, arrays and map keys left out) that tickserve
/// applies. A set field whose path is neither here nor a prefix of one
/// here is reported as ignored.
const APPLIED: &[&str] = &[
    "name",
    "platform",
    "backend",
    "default_model_filename",
    "max_batch_size",
    "version_policy.latest.num_versions",
    "version_policy.all",
    "version_policy.specific.versions",
    "input.name",
    "input.data_type",
    "input.dims",
    "input.reshape.shape",
    "output.name",
    "output.data_type",
    "output.dims",
    "output.reshape.shape",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.priority_levels",
    "dynamic_batching.default_priority_level",
    "dynamic_batching.default_queue_policy.timeout_action",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "dynamic_batching.default_queue_policy.allow_timeout_override",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "dynamic_batching.priority_queue_policy.timeout_action",
    "dynamic_batching.priority_queue_policy.default_timeout_microseconds",
    "dynamic_batching.priority_queue_policy.allow_timeout_override",
    "dynamic_batching.priority_queue_policy.max_queue_size",
    "instance_group.count",
    "instance_group.kind",
    "instance_group.gpus",
    "response_cache.enable",
];

/// Fields that are protobuf maps: their keys are data, not field names.
const MAPS: &[&str] = &[
    "dynamic_batching.priority_queue_policy",
    "cc_model_filenames",
    "metric_tags",
    "parameters",
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Triton {
    name: String,
    platform: String,
    backend: String,
    default_model_filename: String,
    max_batch_size: i64,
    version_policy: Option<TritonVersionPolicy>,
    input: Vec<TritonTensor>,
    output: Vec<TritonTensor>,
    dynamic_batching: Option<TritonBatching>,
    instance_group: Vec<TritonGroup>,
    response_cache: Option<TritonCache>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonVersionPolicy {
    latest: Option<TritonLatest>,
    all: Option<Value>,
    specific: Option<TritonSpecific>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonLatest {
    num_versions: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonSpecific {
    versions: Vec<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonTensor {
    name: String,
    data_type: String,
    dims: Vec<i64>,
    reshape: Option<TritonReshape>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonReshape {
    shape: Vec<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonBatching {
    max_queue_delay_microseconds: u64,
    priority_levels: u64,
    default_priority_level: u64,
    default_queue_policy: Option<TritonQueuePolicy>,
    priority_queue_policy: BTreeMap<String, TritonQueuePolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonQueuePolicy {
    timeout_action: String,
    default_timeout_microseconds: u64,
    allow_timeout_override: bool,
    max_queue_size: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonGroup {
    kind: String,
    count: i64,
    gpus: Vec<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TritonCache {
    enable: bool,
}

/// A config.pbtxt as tickserve applies it, and the fields it sets that
/// tickserve does not apply (for the one warning at load).
#[derive(Debug, Clone)]
pub struct Pbtxt {
    pub config: ModelConfig,
    pub ignored: Vec<String>,
}

/// Reads and converts one config.pbtxt.
pub fn read_pbtxt(path: &Path) -> Result<Pbtxt, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(RepositoryError::io(path))?;
    parse_pbtxt(&text).map_err(|reason| RepositoryError::Config {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses config.pbtxt text; the error is the reason, without the path.
pub fn parse_pbtxt(text: &str) -> Result<Pbtxt, String> {
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let descriptor = pool
        .get_message_by_name("inference.ModelConfig")
        .ok_or("the built-in model_config schema has no inference.ModelConfig")?;
    let text = colon_before_message_lists(text);
    let message = DynamicMessage::parse_text_format(descriptor, &text)
        .map_err(|e| format!("not valid protobuf text format of Triton's ModelConfig: {e}"))?;
    from_message(&message)
}

fn from_message(message: &DynamicMessage) -> Result<Pbtxt, String> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(true);
    let json = message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| e.to_string())?;
    let mut ignored = Vec::new();
    unapplied("", &json, &mut ignored);
    let triton: Triton = serde_json::from_value(json).map_err(|e| e.to_string())?;
    let config = convert(triton, &mut ignored)?;
    crate::config::check_config(&config)?;
    Ok(Pbtxt { config, ignored })
}

/// Adds the optional colon between a field name and a message list
/// (`input [ { … } ]` → `input: [ { … } ]`).
///
/// The text format allows leaving it out before a list of messages, and
/// Triton's configs nearly always do, but prost-reflect 0.16's parser only
/// accepts it before a single `{ … }`. Adding it changes nothing else: a
/// `[` right after an identifier can only open a message list there,
/// since scalar lists need the colon and values are never followed by `[`
/// in this schema (it has no extensions). Strings and `#` comments are
/// copied untouched.
fn colon_before_message_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut comment = false;
    for c in text.chars() {
        if comment {
            comment = c != '\n';
        } else if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
        } else if c == '"' || c == '\'' {
            quote = Some(c);
        } else if c == '#' {
            comment = true;
        } else if c == '[' {
            let before = out.trim_end();
            if before.ends_with(|b: char| b.is_ascii_alphanumeric() || b == '_') {
                let at = before.len();
                out.insert(at, ':');
            }
        }
        out.push(c);
    }
    out
}

/// Parses Triton's JSON form of a model configuration (the `config`
/// parameter of a repository load request) with the same schema and rules
/// as a config.pbtxt.
pub fn parse_json_config(text: &str) -> Result<Pbtxt, String> {
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    let descriptor = pool
        .get_message_by_name("inference.ModelConfig")
        .ok_or("the built-in model_config schema has no inference.ModelConfig")?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let message = DynamicMessage::deserialize(descriptor, &mut deserializer)
        .map_err(|e| format!("not valid JSON of Triton's ModelConfig: {e}"))?;
    from_message(&message)
}

/// Collects the set fields under `value` (at `path`) that are not applied.
fn unapplied(path: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            for item in items {
                unapplied(path, item, out);
            }
        }
        Value::Object(fields) if MAPS.contains(&path) => {
            for item in fields.values() {
                unapplied(path, item, out);
            }
        }
        Value::Object(fields) => {
            for (name, item) in fields {
                let child = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                let applied = APPLIED.iter().any(|a| {
                    *a == child || (a.starts_with(&child) && a[child.len()..].starts_with('.'))
                });
                if !applied {
                    if !out.contains(&child) {
                        out.push(child);
                    }
                } else {
                    unapplied(&child, item, out);
                }
            }
        }
        _ => {}
    }
}

fn convert(triton: Triton, ignored: &mut Vec<String>) -> Result<ModelConfig, String> {
    let mut config = ModelConfig::default();
    let onnx_platform = matches!(triton.platform.as_str(), "" | "onnxruntime_onnx");
    let onnx_backend = matches!(triton.backend.as_str(), "" | "onnxruntime");
    if !onnx_platform || !onnx_backend {
        return Err(format!(
            "platform '{}' / backend '{}': tickserve serves ONNX models (platform: \"onnxruntime_onnx\" or backend: \"onnxruntime\")",
            triton.platform, triton.backend
        ));
    }
    if !triton.default_model_filename.is_empty() && triton.default_model_filename != MODEL_FILE {
        return Err(format!(
            "default_model_filename '{}': tickserve reads <version>/{MODEL_FILE}",
            triton.default_model_filename
        ));
    }
    if !triton.name.is_empty() {
        config.name = Some(triton.name);
    }
    match triton.max_batch_size {
        0 if !triton.input.is_empty() => {
            return Err(
                "max_batch_size 0 (no batch axis in dims) is not supported: tickserve batches every model, so set max_batch_size to at least 1 and give dims without the batch axis".into(),
            );
        }
        0 => {}
        n if n < 0 => return Err(format!("max_batch_size {n} is negative")),
        n => config.max_batch_size = usize::try_from(n).map_err(|e| e.to_string())?,
    }
    if let Some(policy) = triton.version_policy {
        config.version_policy = if let Some(latest) = policy.latest {
            VersionPolicy::Latest(usize::try_from(latest.num_versions).map_err(|e| e.to_string())?)
        } else if policy.all.is_some() {
            VersionPolicy::All
        } else if let Some(specific) = policy.specific {
            VersionPolicy::Specific(
                specific
                    .versions
                    .iter()
                    .map(|&v| u64::try_from(v).map_err(|_| format!("version {v} is negative")))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            VersionPolicy::default()
        };
    }
    config.inputs = tensors("input", triton.input)?;
    config.outputs = tensors("output", triton.output)?;
    let batching = &mut config.dynamic_batching;
    match triton.dynamic_batching {
        // Without dynamic_batching Triton runs requests as they come;
        // tickserve still merges what is already queued but never waits.
        None => batching.max_queue_delay = Some(Duration::ZERO),
        Some(dynamic) => {
            batching.max_queue_delay =
                Some(Duration::from_micros(dynamic.max_queue_delay_microseconds));
            if dynamic.priority_levels > 5 {
                return Err(format!(
                    "dynamic_batching.priority_levels {}: tickserve has 5 priority classes (1 highest); use at most 5 levels",
                    dynamic.priority_levels
                ));
            }
            if dynamic.default_priority_level > 0 {
                if dynamic.default_priority_level > dynamic.priority_levels {
                    return Err(format!(
                        "dynamic_batching.default_priority_level {} is above priority_levels {}",
                        dynamic.default_priority_level, dynamic.priority_levels
                    ));
                }
                batching.default_priority =
                    u8::try_from(dynamic.default_priority_level).map_err(|e| e.to_string())?;
            }
            if let Some(policy) = &dynamic.default_queue_policy {
                let applied = queue_policy(policy, "default_queue_policy", ignored)?;
                if let Some(size) = applied.max_queue_size {
                    batching.max_queue_size = size;
                }
                for level in 1..=5u8 {
                    batching.priority.insert(
                        level.to_string(),
                        PriorityConfig {
                            max_queue_size: None,
                            ..applied.clone()
                        },
                    );
                }
            }
            for (level, policy) in &dynamic.priority_queue_policy {
                let valid = level
                    .parse::<u64>()
                    .ok()
                    .filter(|l| (1..=dynamic.priority_levels.max(1)).contains(l));
                if valid.is_none() {
                    return Err(format!(
                        "dynamic_batching.priority_queue_policy key {level}: expected a priority level 1 to priority_levels ({})",
                        dynamic.priority_levels
                    ));
                }
                let applied =
                    queue_policy(policy, &format!("priority_queue_policy[{level}]"), ignored)?;
                batching.priority.insert(level.clone(), applied);
            }
        }
    }
    if !triton.instance_group.is_empty() {
        let mut instances = 0;
        for group in &triton.instance_group {
            instances += match group.count {
                0 => 1,
                n if n < 0 => return Err(format!("instance_group count {n} is negative")),
                n => usize::try_from(n).map_err(|e| e.to_string())?,
            };
        }
        config.instances = instances;
        let kinds: Vec<&str> = triton
            .instance_group
            .iter()
            .map(|g| g.kind.as_str())
            .collect();
        if kinds.iter().all(|k| *k == "KIND_CPU") {
            config.cpu_only = true;
        }
        if let Some(gpu) = triton.instance_group.iter().find_map(|g| g.gpus.first()) {
            config.device = usize::try_from(*gpu).map_err(|e| e.to_string())?;
        }
        config.engine = EngineChoice::Auto;
    }
    // Triton caches a model's responses only when its config asks to.
    config.cache.enabled = triton.response_cache.is_some_and(|c| c.enable);
    Ok(config)
}

fn queue_policy(
    policy: &TritonQueuePolicy,
    at: &str,
    ignored: &mut Vec<String>,
) -> Result<PriorityConfig, String> {
    if policy.timeout_action == "DELAY" {
        ignored.push(format!(
            "dynamic_batching.{at}.timeout_action DELAY (tickserve rejects a request past its timeout)"
        ));
    }
    Ok(PriorityConfig {
        max_queue_size: match policy.max_queue_size {
            // Triton: 0 is unlimited; tickserve keeps its bounded default.
            0 => None,
            n => Some(usize::try_from(n).map_err(|e| e.to_string())?),
        },
        default_timeout: (policy.default_timeout_microseconds > 0)
            .then(|| Duration::from_micros(policy.default_timeout_microseconds)),
        allow_timeout_override: Some(policy.allow_timeout_override),
        ..PriorityConfig::default()
    })
}

fn tensors(kind: &str, tensors: Vec<TritonTensor>) -> Result<Vec<TensorConfig>, String> {
    tensors
        .into_iter()
        .map(|t| {
            let triton_type = if t.data_type.is_empty() {
                "TYPE_INVALID"
            } else {
                t.data_type.as_str()
            };
            let datatype = triton_type
                .strip_prefix("TYPE_")
                .and_then(DataType::parse)
                .ok_or_else(|| {
                    format!(
                        "{kind} '{}' has data_type {triton_type}; tickserve serves {}",
                        t.name,
                        DataType::ALL
                            .map(|d| format!("TYPE_{}", d.as_str()))
                            .join(", ")
                    )
                })?;
            let dims = |dims: &[i64], what: &str| -> Result<Vec<usize>, String> {
                dims.iter()
                    .map(|&d| {
                        usize::try_from(d).ok().filter(|&d| d > 0).ok_or_else(|| {
                            format!(
                                "{kind} '{}' has {what} {dims:?}: variable (-1) or zero dimensions are not supported; give the fixed size",
                                t.name
                            )
                        })
                    })
                    .collect()
            };
            Ok(TensorConfig {
                name: t.name.clone(),
                datatype: datatype.as_str().to_owned(),
                dims: dims(&t.dims, "dims")?,
                reshape: t
                    .reshape
                    .as_ref()
                    .map(|r| dims(&r.shape, "reshape"))
                    .transpose()?,
            })
        })
        .collect()
}
