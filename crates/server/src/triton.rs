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
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tickserve_engine::{DataType, TensorSpec};
use tickserve_scheduler::stats::{Timed, Timing};
use tickserve_scheduler::{Priority, StatsSnapshot};

use crate::error::ServeError;
use crate::models::ModelVersion;
use crate::registry::ModelRegistry;

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

/// Per-class counts the result cache adds to the scheduler's.
#[derive(Debug, Default)]
struct CacheClass {
    success: Timed,
    fail: Timed,
    queue: Timed,
}

/// Triton's statistics of one version that the scheduler cannot see,
/// kept by the cache step (crate::cached): requests answered without the
/// queue, and Triton's `cache_hit` / `cache_miss`.
#[derive(Debug, Default)]
pub struct CacheStats {
    classes: [CacheClass; Priority::LEVELS],
    cache_hit: Timed,
    cache_miss: Timed,
}

impl CacheStats {
    /// A request the result cache answered without the queue (every row
    /// cached, or computed by an identical request in flight). As in
    /// Triton, it counts in `success` (or `fail`) and `queue` (for the time
    /// it `waited` for rows in flight; zero for a pure cache hit), never in
    /// the compute counters, `inference_count` or `execution_count`.
    pub fn record_answered_without_queue(
        &self,
        priority: Priority,
        took: Duration,
        waited: Duration,
        ok: bool,
    ) {
        let class = &self.classes[priority.index()];
        if ok {
            class.success.add(took);
            class.queue.add(waited);
        } else {
            class.fail.add(took);
        }
    }

    /// Triton's `cache_hit`: a request answered wholly from the cache and
    /// the time its lookup and assembly took.
    pub fn record_cache_hit(&self, took: Duration) {
        self.cache_hit.add(took);
    }

    /// Triton's `cache_miss`: a request with rows missing from the cache
    /// and the time spent looking them up and storing the computed ones.
    /// As Triton does, that time is added to the request's `success`
    /// duration (the scheduler timed only its queue-to-answer part), or to
    /// nothing when `queued` is false (the caller timed it all).
    pub fn record_cache_miss(&self, priority: Priority, took: Duration, queued: bool) {
        self.cache_miss.add(took);
        if queued {
            self.classes[priority.index()].success.add_ns(took);
        }
    }

    /// The scheduler's counters with these added.
    pub fn merge(&self, mut scheduler: StatsSnapshot) -> TritonStats {
        for class in &mut scheduler.classes {
            let own = &self.classes[class.priority.index()];
            let plus = |a: Timing, b: Timing| Timing {
                count: a.count + b.count,
                ns: a.ns + b.ns,
            };
            class.success = plus(class.success, own.success.read());
            class.fail = plus(class.fail, own.fail.read());
            class.queue = plus(class.queue, own.queue.read());
        }
        TritonStats {
            scheduler,
            cache_hit: self.cache_hit.read(),
            cache_miss: self.cache_miss.read(),
        }
    }
}

/// Everything the statistics endpoints show of one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonStats {
    /// The scheduler's counters, with the cache's per-class counts added.
    pub scheduler: StatsSnapshot,
    /// Requests answered wholly from the result cache, and the time to
    /// look their rows up and assemble the answer.
    pub cache_hit: Timing,
    /// Requests with at least one row not in the cache, and the time spent
    /// looking up and storing rows (not the engine's time).
    pub cache_miss: Timing,
}

fn timing(t: Timing) -> Value {
    json!({ "count": t.count, "ns": t.ns })
}

fn sum(items: impl Iterator<Item = Timing>) -> Timing {
    items.fold(Timing::default(), |a, b| Timing {
        count: a.count + b.count,
        ns: a.ns + b.ns,
    })
}

/// Triton's per-version `inference_stats` totals, summed over the
/// priority classes and batch sizes of [`TritonStats`]. The HTTP
/// and gRPC statistics both answer from these.
///
/// With the result cache, Triton's rules hold: a request answered from the
/// cache counts in `success`, `queue` and `cache_hit`, never in the
/// compute counters; a request with rows the engine had to compute counts
/// in `cache_miss` as well as in the usual ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TritonTotals {
    pub success: Timing,
    pub fail: Timing,
    pub queue: Timing,
    pub compute_input: Timing,
    pub compute_infer: Timing,
    pub compute_output: Timing,
    pub cache_hit: Timing,
    pub cache_miss: Timing,
}

impl TritonTotals {
    pub fn of(stats: &TritonStats) -> Self {
        let TritonStats {
            scheduler: stats,
            cache_hit,
            cache_miss,
        } = stats;
        let classes = &stats.classes;
        let compute_infer = sum(classes.iter().map(|c| c.compute_infer));
        // Triton counts every compute phase per request, and perf_analyzer
        // refuses statistics whose three compute counts differ: the
        // gathering and scattering time, measured per batch, is reported
        // over the same request count as the engine time.
        let per_request = |batch_total: Timing| Timing {
            count: compute_infer.count,
            ns: batch_total.ns,
        };
        TritonTotals {
            success: sum(classes.iter().map(|c| c.success)),
            fail: sum(classes.iter().map(|c| c.fail)),
            queue: sum(classes.iter().map(|c| c.queue)),
            compute_input: per_request(sum(stats.batches.iter().map(|b| b.compute_input))),
            compute_infer,
            compute_output: per_request(sum(stats.batches.iter().map(|b| b.compute_output))),
            cache_hit: *cache_hit,
            cache_miss: *cache_miss,
        }
    }
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
