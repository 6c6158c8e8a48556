//! The server's side of scheduling: turning a model's config.toml into a
//! [`SchedulerConfig`], turning a request's scheduling parameters into
//! [`InferOptions`] (protocol-neutral, so gRPC maps its parameters the same
//! way), and the statistics endpoint's body (Triton's shape,
//! serving-systems.md §6, plus per-priority counts). docs/scheduling.md
//! describes the behaviour.

use std::time::Duration;

use serde_json::{Value, json};
use tickserve_repository::ModelEntry;
use tickserve_scheduler::stats::Timing;
use tickserve_scheduler::{
    AdaptiveConfig, Aging, ClassPolicy, ClassSet, InferOptions, InstanceGroup, Priority,
    SchedulerConfig, StatsSnapshot,
};

use crate::error::ServeError;

/// Request parameter naming the priority as an integer 1–5.
pub const PRIORITY_PARAMETER: &str = "priority";
/// Request parameter naming the priority by request type.
pub const REQUEST_TYPE_PARAMETER: &str = "request_type";
/// Request parameter: the request's own timeout, microseconds.
pub const TIMEOUT_PARAMETER: &str = "timeout";
/// HTTP header naming the priority (integer or request type).
pub const PRIORITY_HEADER: &str = "x-priority";

/// The scheduler configuration of one model, config.toml over the seed's
/// defaults.
pub fn scheduler_config(entry: &ModelEntry) -> SchedulerConfig {
    let config = &entry.config;
    let batching = &config.dynamic_batching;
    let mut scheduler = SchedulerConfig::new(entry.name.clone(), config.max_batch_size);
    scheduler.instances = config.instances;
    scheduler.instance_groups = config
        .instance_group
        .iter()
        .map(|group| InstanceGroup {
            count: group.count,
            classes: if group.priorities.is_empty() {
                ClassSet::ALL
            } else {
                ClassSet::of(
                    group
                        .priorities
                        .iter()
                        .filter_map(|&p| Priority::new(i64::from(p))),
                )
            },
            cores: group.cores.clone(),
        })
        .collect();
    scheduler.chunking = batching.chunking;
    scheduler.chunk_rows = batching.chunk_rows;
    scheduler.work_conserving = batching.work_conserving;
    scheduler.default_priority =
        Priority::new(i64::from(batching.default_priority)).unwrap_or(scheduler.default_priority);
    scheduler.aging = Aging {
        threshold: batching.aging_threshold,
        interval: batching.aging_interval,
        max_levels: batching.max_aging_levels,
    };
    scheduler.classes = Priority::ALL.map(|p| {
        let defaults = ClassPolicy::default_for(p);
        let own = batching.priority.get(p.label());
        ClassPolicy {
            max_queue_delay: own
                .and_then(|o| o.max_queue_delay)
                .or(batching.max_queue_delay)
                .unwrap_or(defaults.max_queue_delay),
            max_queue_size: own
                .and_then(|o| o.max_queue_size)
                .unwrap_or(batching.max_queue_size),
            default_timeout: own
                .and_then(|o| o.default_timeout)
                .unwrap_or(defaults.default_timeout),
            allow_timeout_override: own
                .and_then(|o| o.allow_timeout_override)
                .unwrap_or(defaults.allow_timeout_override),
            // "0s" turns a default target off.
            target_latency: match own.and_then(|o| o.target_latency) {
                Some(t) if t.is_zero() => None,
                Some(t) => Some(t),
                None => defaults.target_latency,
            },
        }
    });
    let adaptive = &config.adaptive_batching;
    scheduler.adaptive = AdaptiveConfig {
        enabled: adaptive.enabled,
        interval: adaptive.interval,
        min_batch_size: adaptive.min_batch_size,
        shrink_above_utilisation: f64::from(adaptive.shrink_above_utilisation),
        grow_below_utilisation: f64::from(adaptive.grow_below_utilisation),
        grow_below_memory: f64::from(adaptive.grow_below_memory),
        slo_p99: adaptive.slo_p99,
        slo_margin: f64::from(adaptive.slo_margin_percent) / 100.0,
    };
    scheduler
}

/// A scheduling parameter as a protocol decoded it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<'a> {
    Int(i64),
    Str(&'a str),
    /// Anything else (bool, float, object), by its type name.
    Other(&'static str),
}

impl Param<'_> {
    /// A JSON value as a parameter.
    pub fn from_json(value: &Value) -> Param<'_> {
        match value {
            Value::Number(n) => n
                .as_i64()
                .map_or(Param::Other("a non-integer number"), Param::Int),
            Value::String(s) => Param::Str(s),
            Value::Bool(_) => Param::Other("a boolean"),
            Value::Null => Param::Other("null"),
            Value::Array(_) => Param::Other("an array"),
            Value::Object(_) => Param::Other("an object"),
        }
    }
}

fn invalid_priority(what: &str, got: String) -> ServeError {
    ServeError::Invalid(format!(
        "invalid {what} {got}; allowed: {}",
        Priority::allowed()
    ))
}

fn priority_of(what: &str, param: Param<'_>) -> Result<Priority, ServeError> {
    match param {
        Param::Int(level) => {
            Priority::new(level).ok_or_else(|| invalid_priority(what, level.to_string()))
        }
        Param::Str(text) => {
            Priority::parse(text).ok_or_else(|| invalid_priority(what, format!("'{text}'")))
        }
        Param::Other(kind) => Err(invalid_priority(what, kind.to_owned())),
    }
}

/// Resolves the scheduling options of a request: the `priority` and
/// `request_type` parameters (which must agree when both are given), else
/// the `x-priority` header, else the model default; and the `timeout`
/// parameter in microseconds. Out-of-range or unknown values are refused
/// with the allowed values (Triton silently uses the default instead).
pub fn resolve_options(
    priority: Option<Param<'_>>,
    request_type: Option<Param<'_>>,
    timeout_us: Option<Param<'_>>,
    header: Option<&str>,
) -> Result<InferOptions, ServeError> {
    let by_level = priority
        .map(|p| priority_of("priority parameter", p))
        .transpose()?;
    let by_type = request_type
        .map(|p| match p {
            Param::Str(name) => Priority::from_name(name)
                .ok_or_else(|| invalid_priority("request_type parameter", format!("'{name}'"))),
            other => priority_of("request_type parameter", other),
        })
        .transpose()?;
    let by_header = header
        .map(|h| priority_of("x-priority header", Param::Str(h)))
        .transpose()?;
    if let (Some(a), Some(b)) = (by_level, by_type)
        && a != b
    {
        return Err(ServeError::Invalid(format!(
            "the priority parameter ({a}) and the request_type parameter ({b}) disagree"
        )));
    }
    let timeout = match timeout_us {
        None => None,
        Some(Param::Int(us)) if us > 0 => Some(Duration::from_micros(us as u64)),
        Some(Param::Int(us)) => {
            return Err(ServeError::Invalid(format!(
                "invalid timeout parameter {us}; expected a positive number of microseconds"
            )));
        }
        Some(Param::Str(s)) => {
            return Err(ServeError::Invalid(format!(
                "invalid timeout parameter '{s}'; expected a positive integer number of microseconds"
            )));
        }
        Some(Param::Other(kind)) => {
            return Err(ServeError::Invalid(format!(
                "invalid timeout parameter ({kind}); expected a positive integer number of microseconds"
            )));
        }
    };
    Ok(InferOptions {
        priority: by_level.or(by_type).or(by_header),
        timeout,
    })
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
/// priority classes and batch sizes of the scheduler's counters. The HTTP
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
    pub fn of(stats: &StatsSnapshot) -> Self {
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
            cache_hit: stats.cache_hit,
            cache_miss: stats.cache_miss,
        }
    }
}

/// One entry of `model_stats`.
pub fn model_stats(name: &str, version: u64, stats: &StatsSnapshot) -> Value {
    let classes = &stats.classes;
    let totals = TritonTotals::of(stats);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_comes_from_parameters_then_header() {
        let o = resolve_options(Some(Param::Int(1)), None, None, Some("5")).unwrap();
        assert_eq!(o.priority, Priority::new(1));
        let o = resolve_options(None, Some(Param::Str("background")), None, None).unwrap();
        assert_eq!(o.priority, Priority::new(5));
        let o = resolve_options(None, None, None, Some("market_data_update")).unwrap();
        assert_eq!(o.priority, Priority::new(2));
        let o = resolve_options(None, None, Some(Param::Int(1500)), None).unwrap();
        assert_eq!(
            o,
            InferOptions {
                priority: None,
                timeout: Some(Duration::from_micros(1500))
            }
        );
    }

    #[test]
    fn invalid_values_say_what_is_allowed() {
        for (p, t, h) in [
            (Some(Param::Int(0)), None, None),
            (Some(Param::Int(6)), None, None),
            (None, Some(Param::Str("urgent")), None),
            (None, None, Some("9")),
            (Some(Param::Other("a boolean")), None, None),
        ] {
            let err = resolve_options(p, t, None, h).unwrap_err();
            assert!(matches!(err, ServeError::Invalid(_)));
            assert!(err.to_string().contains("1 = real_time_trading"), "{err}");
        }
        let err = resolve_options(
            Some(Param::Int(1)),
            Some(Param::Str("background")),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
        let err = resolve_options(None, None, Some(Param::Int(0)), None).unwrap_err();
        assert!(
            err.to_string().contains("positive number of microseconds"),
            "{err}"
        );
    }
}
