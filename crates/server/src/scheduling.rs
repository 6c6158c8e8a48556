//! The server's side of scheduling: turning a model's config.toml into a
//! [`SchedulerConfig`], turning a request's scheduling parameters into
//! [`InferOptions`] (protocol-neutral, so gRPC maps its parameters the same
//! way). docs/scheduling.md describes the behaviour; the statistics
//! endpoint's body is in crate::triton.

use std::time::Duration;

use serde_json::Value;
use tickserve_repository::ModelEntry;
use tickserve_scheduler::{
    AdaptiveConfig, Aging, ClassPolicy, ClassSet, InferOptions, InstanceGroup, Priority,
    SchedulerConfig,
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
            nice: group.nice,
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
