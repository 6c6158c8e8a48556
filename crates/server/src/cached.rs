//! The cache step of the inference path (crate::infer): per-row lookup,
//! only missing rows go to the scheduler, the outputs are reassembled in
//! request order.
//!
//! ```text
//!  request (n rows) ─▶ n keys ─▶ L1 ─▶ misses: claim single-flight
//!     leaders: L1 again ─▶ L2 (Redis) ─▶ still missing: ONE scheduler call
//!              with just those rows ─▶ store (L1 now, Redis write-behind)
//!     followers: wait for the leader's row (coalesced)
//!  ─▶ rows in request order ─▶ back to crate::infer, which responds
//! ```
//!
//! It runs after validation and before the answer is shaped, both of which
//! crate::infer does once for cached and uncached requests alike. A
//! request whose rows are all cached never reaches the queue. The cache
//! is skipped when the server's cache is off, the model's `[cache]` says
//! `enabled = false`, or the request sets the parameter `"cache": false`.
//!
//! Triton's statistics are kept here for what the scheduler cannot see
//! (version_stats.rs `CacheStats`, merged with the scheduler's counters): a request answered
//! without the queue counts in `success` and `queue`, and every cached
//! request is a `cache_hit` (all rows found) or a `cache_miss` (some rows
//! computed, here or by an identical request in flight).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tickserve_cache::flight::{Claim, Leader, SingleFlight};
use tickserve_cache::{CacheKey, KeyInput, ResultCache, Row, row_key};
use tickserve_scheduler::Priority;
use tickserve_telemetry::traces::TRACE_TARGET;

use crate::error::ServeError;
use crate::models::{InferRequest, ModelVersion};

/// Request parameters that never change a result, so they stay out of the
/// key. Every other request parameter is part of it.
pub(crate) const PARAMETERS_NOT_IN_KEY: [&str; 5] = [
    crate::infer::CACHE_PARAMETER,
    crate::scheduling::PRIORITY_PARAMETER,
    crate::scheduling::REQUEST_TYPE_PARAMETER,
    crate::scheduling::TIMEOUT_PARAMETER,
    // Changes how outputs are encoded, not their values.
    "binary_data_output",
];

/// The server's cache and its table of rows in flight.
#[derive(Debug)]
pub(crate) struct CacheLayer {
    pub(crate) cache: ResultCache,
    flights: SingleFlight<Result<Row, ServeError>>,
}

type RowLeader = Leader<Result<Row, ServeError>>;

impl CacheLayer {
    pub(crate) fn new(cache: ResultCache) -> Self {
        CacheLayer {
            cache,
            flights: SingleFlight::new(),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

/// The request parameters that can change the result, as canonical JSON
/// (keys sorted), or nothing when there are none.
fn key_parameters(parameters: &serde_json::Map<String, Value>) -> Vec<u8> {
    let kept: std::collections::BTreeMap<&String, &Value> = parameters
        .iter()
        .filter(|(name, _)| !PARAMETERS_NOT_IN_KEY.contains(&name.as_str()))
        .collect();
    if kept.is_empty() {
        return Vec::new();
    }
    serde_json::to_vec(&kept).unwrap_or_default()
}

impl CacheLayer {
    /// The outputs (signature order, `rows` rows each) of a validated
    /// request whose inputs feed the signature in `order`, through the
    /// cache, plus Triton's statistics of the request under `priority`
    /// (resolved by crate::infer). `started` is when validation began.
    pub(crate) async fn outputs(
        &self,
        version: &ModelVersion,
        request: &InferRequest,
        priority: Priority,
        rows: usize,
        order: &[usize],
        started: Instant,
    ) -> Result<Vec<Vec<f32>>, ServeError> {
        let mut trace = Trace::default();
        let answer = self
            .lookup_and_run(version, request, rows, order, &mut trace)
            .await;
        let took = started.elapsed();
        let counters = version.cache_stats();
        let missed = trace.queued || trace.coalesced;
        if !trace.queued {
            counters.record_answered_without_queue(priority, took, trace.waited, answer.is_ok());
        }
        if answer.is_ok() {
            if missed {
                // Triton times a miss as its lookup plus its insertion.
                let cache_time = if trace.queued {
                    trace.cache_time
                } else {
                    took.saturating_sub(trace.waited)
                };
                counters.record_cache_miss(priority, cache_time, trace.queued);
            } else {
                counters.record_cache_hit(took);
            }
        }
        answer
    }

    async fn lookup_and_run(
        &self,
        version: &ModelVersion,
        request: &InferRequest,
        rows: usize,
        order: &[usize],
        trace: &mut Trace,
    ) -> Result<Vec<Vec<f32>>, ServeError> {
        let started = Instant::now();
        // Open over the lookups only; the rows computed afterwards show as
        // their own queue and engine spans.
        let lookup = tracing::info_span!(
            target: TRACE_TARGET,
            "cache",
            rows,
            hits = tracing::field::Empty,
            computed = tracing::field::Empty,
            coalesced = tracing::field::Empty,
        );
        let model = version.name.as_str();
        let ttl = version.cache.ttl.unwrap_or(self.cache.config().ttl);
        let parameters = key_parameters(&request.parameters);
        let specs = &version.signature.inputs;
        let keys: Vec<CacheKey> = (0..rows)
            .map(|r| {
                let mut inputs: Vec<KeyInput<'_>> = order
                    .iter()
                    .zip(specs)
                    .map(|(&i, spec)| {
                        let tensor = &request.inputs[i];
                        let len = spec.row_len();
                        KeyInput {
                            name: &tensor.name,
                            datatype: &tensor.datatype,
                            shape: &tensor.shape[1..],
                            data: &tensor.data[r * len..(r + 1) * len],
                        }
                    })
                    .collect();
                row_key(
                    model,
                    version.version,
                    &version.engine_variant,
                    &parameters,
                    &mut inputs,
                )
            })
            .collect();

        let mut found = self.cache.get_l1(model, &keys).await;
        let mut leaders: Vec<(usize, RowLeader)> = Vec::new();
        let mut followers = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if found[i].is_some() {
                continue;
            }
            match self.flights.claim(*key) {
                Claim::Leader(leader) => leaders.push((i, leader)),
                Claim::Follower(follower) => followers.push((i, follower)),
            }
        }

        // A new leader looks again: the previous leader of the same key may
        // have stored its row between our L1 lookup and our claim.
        let mut pending = Vec::with_capacity(leaders.len());
        for (i, leader) in leaders {
            match self.cache.peek(&keys[i]).await {
                Some(row) => {
                    found[i] = Some(Arc::clone(&row));
                    leader.complete(Ok(row));
                }
                None => pending.push((i, leader)),
            }
        }

        if !pending.is_empty() && self.cache.l2().is_some() {
            let pending_keys: Vec<CacheKey> = pending.iter().map(|(i, _)| keys[*i]).collect();
            let hits = self.cache.get_l2(model, &pending_keys, ttl).await;
            let mut still = Vec::with_capacity(pending.len());
            for ((i, leader), hit) in pending.into_iter().zip(hits) {
                match hit.filter(|row| fits(version, row)) {
                    Some(row) => {
                        found[i] = Some(Arc::clone(&row));
                        leader.complete(Ok(row));
                    }
                    None => still.push((i, leader)),
                }
            }
            pending = still;
        }

        trace.cache_time = started.elapsed();
        lookup.record("hits", found.iter().filter(|row| row.is_some()).count());
        lookup.record("computed", pending.len());
        lookup.record("coalesced", followers.len());
        drop(lookup);
        if !pending.is_empty() {
            let indices: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
            trace.queued = true;
            match run_rows(version, request, order, &indices).await {
                Ok(computed) => {
                    let storing = Instant::now();
                    for ((i, leader), row) in pending.into_iter().zip(computed) {
                        // Stored before the flight ends: see flight.rs.
                        self.cache.put(model, keys[i], Arc::clone(&row), ttl).await;
                        found[i] = Some(Arc::clone(&row));
                        leader.complete(Ok(row));
                    }
                    trace.cache_time += storing.elapsed();
                }
                Err(error) => {
                    for (_, leader) in pending {
                        leader.complete(Err(error.clone()));
                    }
                    return Err(error);
                }
            }
        }

        let mut coalesced = 0;
        trace.coalesced = !followers.is_empty();
        for (i, follower) in followers {
            let waiting = Instant::now();
            let waited = follower.wait().await;
            trace.waited += waiting.elapsed();
            let row = match waited {
                Some(Ok(row)) => {
                    coalesced += 1;
                    row
                }
                Some(Err(error)) => return Err(error),
                None => {
                    // The leader's client went away before it finished.
                    trace.queued = true;
                    let row = run_rows(version, request, order, &[i])
                        .await?
                        .pop()
                        .ok_or_else(|| ServeError::Internal("the engine returned no row".into()))?;
                    self.cache.put(model, keys[i], Arc::clone(&row), ttl).await;
                    row
                }
            };
            found[i] = Some(row);
        }
        if coalesced > 0 {
            self.cache.record_coalesced(model, coalesced);
        }

        version
            .signature
            .outputs
            .iter()
            .enumerate()
            .map(|(o, spec)| {
                let mut data = Vec::with_capacity(rows * spec.row_len());
                for row in &found {
                    let row = row.as_ref().and_then(|r| r.get(o)).ok_or_else(|| {
                        ServeError::Internal("a row is missing from the cached answer".into())
                    })?;
                    data.extend_from_slice(row);
                }
                Ok(data)
            })
            .collect()
    }
}

/// What happened to one request on its way through the cache, for its
/// statistics.
#[derive(Debug, Default)]
struct Trace {
    /// Some of its rows went to the scheduler, which counts the request in
    /// `success`/`fail`, `queue` and the compute statistics.
    queued: bool,
    /// Some of its rows were computed by identical requests in flight.
    coalesced: bool,
    /// Time waiting for those.
    waited: Duration,
    /// Time looking rows up and storing computed ones (not the engine's).
    cache_time: Duration,
}

/// Whether a row read from Redis has the shape this version answers with.
fn fits(version: &ModelVersion, row: &Row) -> bool {
    row.len() == version.signature.outputs.len()
        && row
            .iter()
            .zip(&version.signature.outputs)
            .all(|(values, spec)| values.len() == spec.row_len())
}

/// Sends rows `indices` of `request` to the scheduler as one request and
/// splits the answer into one row each.
async fn run_rows(
    version: &ModelVersion,
    request: &InferRequest,
    order: &[usize],
    indices: &[usize],
) -> Result<Vec<Row>, ServeError> {
    let inputs = order
        .iter()
        .zip(&version.signature.inputs)
        .map(|(&i, spec)| {
            let len = spec.row_len();
            let data = &request.inputs[i].data;
            let mut values = Vec::with_capacity(indices.len() * len);
            for &r in indices {
                values.extend_from_slice(&data[r * len..(r + 1) * len]);
            }
            values
        })
        .collect();
    let outputs = version
        .scheduler()
        .infer(indices.len(), inputs, request.options)
        .await?;
    (0..indices.len())
        .map(|k| {
            outputs
                .iter()
                .zip(&version.signature.outputs)
                .map(|(values, spec)| {
                    let len = spec.row_len();
                    values
                        .get(k * len..(k + 1) * len)
                        .map(<[f32]>::to_vec)
                        .ok_or_else(|| {
                            ServeError::Internal(format!(
                                "the engine returned {} values for output '{}'; expected {}",
                                values.len(),
                                spec.name,
                                indices.len() * len
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Arc::new)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_parameters_stay_out_of_the_key_and_others_go_in() {
        let params =
            |json: &str| -> serde_json::Map<String, Value> { serde_json::from_str(json).unwrap() };
        assert!(key_parameters(&params(r#"{"cache": true, "priority": "high"}"#)).is_empty());
        let a = key_parameters(&params(r#"{"b": 1, "a": {"y": 2, "x": 1}, "priority": 1}"#));
        let b = key_parameters(&params(r#"{"a": {"x": 1, "y": 2}, "b": 1}"#));
        assert_eq!(a, b, "canonical: sorted, scheduling parameters dropped");
        assert_ne!(
            a,
            key_parameters(&params(r#"{"a": {"x": 1, "y": 3}, "b": 1}"#))
        );
    }
}
