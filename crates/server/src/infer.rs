//! The one inference path every protocol calls after decoding.
//!
//! ```text
//!  front end (http.rs, grpc.rs): decode the wire format
//!   ─▶ infer(): find the version ─▶ decode ─▶ resolve options once
//!       ─▶ [stream request: new rows ─▶ the stream's full window (crate::streams)]
//!       ─▶ validate ─▶ [cache step: only missing rows ─▶] schedule ─▶ respond
//!       ─▶ metrics (model, priority, source = protocol, outcome), SLA sample,
//!          throughput count
//!   ─▶ front end: encode the answer or the error
//! ```
//!
//! The front end runs it inside the request's `infer` span
//! (crate::trace); the decode, cache, queue and engine spans open under
//! it, and the request's model, class, rows and outcome are recorded on
//! it.
//!
//! The front ends never touch the scheduler, the cache or the metrics, so
//! a request counts the same whichever protocol carried it: the same
//! series in Prometheus, the same sample in `/v2/sla` and the dashboard.

use std::time::Instant;

use metrics::{counter, histogram};
use serde_json::Value;
use tickserve_scheduler::Priority;
use tickserve_telemetry as telemetry;
use tickserve_telemetry::traces::TRACE_TARGET;

use crate::AppState;
use crate::error::ServeError;
use crate::models::{InferRequest, InferResponse, InputTensor, ModelVersion};
use crate::streams;
use crate::trace::Protocol;

/// Request parameter: `false` skips the result cache.
pub(crate) const CACHE_PARAMETER: &str = "cache";

/// Answers one inference request for `model` (and `version`, or the
/// latest). `decode` turns the wire message into the protocol-neutral
/// request once the version is known (some wire forms need its signature).
/// Records the request's metrics and its SLA sample.
pub(crate) async fn infer(
    state: &AppState,
    protocol: Protocol,
    model: &str,
    version: Option<&str>,
    decode: impl FnOnce(&ModelVersion) -> Result<InferRequest, ServeError>,
) -> Result<InferResponse, ServeError> {
    let started = Instant::now();
    let version = match state
        .registry()
        .and_then(|registry| registry.get(model)?.version(version))
    {
        // Held until the answer: a swap meanwhile lets this request finish
        // on this version (crate::registry).
        Ok(version) => version,
        Err(error) => {
            // No model to label it with: one error counter, nothing else.
            counter!(telemetry::ERRORS_TOTAL, "model" => "unknown", "error_type" => error.kind(), "priority" => "none")
                .increment(1);
            crate::trace::record_outcome(error.kind(), error.status().is_server_error());
            return Err(error);
        }
    };
    let mut priority = None;
    let mut rows = 0;
    let result = async {
        let mut request =
            tracing::info_span!(target: TRACE_TARGET, "decode").in_scope(|| decode(&version))?;
        let chosen = request
            .options
            .priority
            .unwrap_or_else(|| version.default_priority());
        // Filled here, once: the cache's statistics and the scheduler read
        // the same class.
        request.options.priority = Some(chosen);
        priority = Some(chosen);
        rows = request
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .map_or(0, |&n| n.max(0) as usize);
        match streams::take_sequence(&mut request.parameters)? {
            None => run(state, &version, request, chosen).await,
            Some(sequence) => {
                // The window advances only for a request that was
                // answered (Triton's semantics): a refusal anywhere on the
                // path drops the turn and leaves the window as it was.
                let turn = streams::open(&version, sequence, &mut request).await?;
                let answer = run(state, &version, request, chosen).await?;
                turn.commit();
                Ok(answer)
            }
        }
    }
    .await;
    record(
        state,
        protocol,
        (&version.name, version.version),
        priority,
        rows,
        started,
        &result,
    );
    result
}

/// Validate → (cache step →) schedule → respond, for a request of class
/// `priority` (already in its options).
async fn run(
    state: &AppState,
    version: &ModelVersion,
    request: InferRequest,
    priority: Priority,
) -> Result<InferResponse, ServeError> {
    // Triton's cache statistics time the request from here.
    let started = Instant::now();
    let use_cache = wants_cache(&request)? && version.cache.enabled;
    let (rows, order) = version.validate(&request)?;
    let wanted = version.requested_outputs(request.outputs.as_deref())?;
    let outputs = match state.cache.as_deref() {
        Some(layer) if use_cache => {
            layer
                .outputs(version, &request, priority, rows, &order, started)
                .await?
        }
        _ => {
            let options = request.options;
            let inputs = in_signature_order(request.inputs, &order);
            version.scheduler().infer(rows, inputs, options).await?
        }
    };
    Ok(version.respond(request.id, rows, &wanted, outputs))
}

/// The request's `cache` parameter (default: use the cache).
fn wants_cache(request: &InferRequest) -> Result<bool, ServeError> {
    match request.parameters.get(CACHE_PARAMETER) {
        None | Some(Value::Bool(true)) => Ok(true),
        Some(Value::Bool(false)) => Ok(false),
        Some(other) => Err(ServeError::Invalid(format!(
            "parameter 'cache' must be true or false, not {other}"
        ))),
    }
}

/// Moves each input's data into the signature's order (no copy).
fn in_signature_order(inputs: Vec<InputTensor>, order: &[usize]) -> Vec<Vec<f32>> {
    let mut slots: Vec<Option<InputTensor>> = inputs.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&index| slots[index].take().map(|t| t.data).unwrap_or_default())
        .collect()
}

/// The request's metrics and SLA sample: the same for every protocol.
fn record(
    state: &AppState,
    protocol: Protocol,
    (model, version): (&str, u64),
    priority: Option<Priority>,
    rows: usize,
    started: Instant,
    result: &Result<InferResponse, ServeError>,
) {
    let took = started.elapsed();
    let label = priority.map_or("none", Priority::label);
    let version = version.to_string();
    let outcome = match result {
        Ok(_) => "success",
        Err(error) => {
            counter!(telemetry::ERRORS_TOTAL, "model" => model.to_owned(), "version" => version.clone(), "error_type" => error.kind(), "priority" => label)
                .increment(1);
            if error.status().is_server_error() {
                tracing::warn!(model, source = protocol.label(), %error, "inference request failed");
            }
            error.kind()
        }
    };
    crate::trace::record_request(
        (model, &version),
        priority.map(Priority::level),
        rows,
        outcome,
        result.as_ref().is_err_and(|e| e.status().is_server_error()),
    );
    let batch_type = if rows <= 1 { "single" } else { "multi" };
    counter!(telemetry::REQUESTS_TOTAL, "model" => model.to_owned(), "version" => version.clone(), "outcome" => outcome, "batch_type" => batch_type, "source" => protocol.label(), "priority" => label)
        .increment(1);
    histogram!(telemetry::REQUEST_LATENCY, "model" => model.to_owned(), "version" => version, "batch_size_range" => telemetry::batch_size_range(rows), "priority" => label)
        .record(took.as_secs_f64());
    state
        .sla
        .record(model, priority.map(Priority::level), took, result.is_ok());
    if result.is_ok() {
        state.throughput.record(model, Instant::now());
    }
}
