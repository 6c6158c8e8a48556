//! Streams: per-instrument windows kept by the server, so a client sends
//! each tick once (docs/streams.md).
//!
//! A request names a stream with Triton's sequence parameters
//! (`sequence_id`, a number or a string; `sequence_start`; `sequence_end`)
//! in its `parameters` (HTTP JSON, or `ModelInferRequest.parameters` over
//! gRPC) and sends only its new rows, shape `[1, k, F]` with 1 ≤ k ≤ T.
//! crate::infer calls [`open`] after decoding:
//!
//! ```text
//!  take_sequence(): read and remove the sequence parameters
//!  open(): check the new rows fully (nothing is stored yet)
//!   ─▶ store.begin(): the stream's turn, the next window
//!   ─▶ the request's input becomes the full window [1, T, F]
//!  crate::infer runs it like any full-window request (validation,
//!  cache, scheduler), then commits the turn only if it was answered
//! ```
//!
//! The sequence parameters are removed before the normal path, so the
//! result cache keys on the window alone: a stream's answer and the same
//! window sent whole share one cache entry.

use serde_json::Value;

use crate::error::ServeError;
use crate::models::{InferRequest, ModelVersion};

pub use crate::stream_store::StreamError;

pub(crate) use crate::stream_store::{StreamId, StreamStore, Turn, WindowShape};
use tickserve_engine::{DataType, Signature};
use tickserve_repository::ModelEntry;

/// Request parameter naming the stream (Triton's).
pub const SEQUENCE_ID: &str = "sequence_id";
/// Request parameter: `true` starts (or restarts) the stream with this
/// request's rows.
pub const SEQUENCE_START: &str = "sequence_start";
/// Request parameter: `true` drops the stream once this request is
/// answered.
pub const SEQUENCE_END: &str = "sequence_end";

/// Longest string `sequence_id`, in bytes.
const MAX_ID_BYTES: usize = 256;

/// The sequence parameters of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequence {
    pub(crate) id: StreamId,
    pub(crate) start: bool,
    pub(crate) end: bool,
}

/// Reads and removes the sequence parameters; `None` when the request
/// names no stream.
pub(crate) fn take_sequence(
    parameters: &mut serde_json::Map<String, Value>,
) -> Result<Option<Sequence>, ServeError> {
    let id = parameters.remove(SEQUENCE_ID);
    let start = flag(parameters.remove(SEQUENCE_START), SEQUENCE_START)?;
    let end = flag(parameters.remove(SEQUENCE_END), SEQUENCE_END)?;
    let id = match id {
        None | Some(Value::Null) if start || end => {
            return Err(ServeError::Invalid(format!(
                "{SEQUENCE_START} and {SEQUENCE_END} need a {SEQUENCE_ID}"
            )));
        }
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) | None => {
                return Err(ServeError::Invalid(format!(
                    "{SEQUENCE_ID} must be a positive integer or a non-empty string, not {n} (0 means no sequence in Triton)"
                )));
            }
            Some(n) => StreamId::Number(n),
        },
        Some(Value::String(text)) if text.is_empty() || text.len() > MAX_ID_BYTES => {
            return Err(ServeError::Invalid(format!(
                "a string {SEQUENCE_ID} must have 1 to {MAX_ID_BYTES} bytes, not {}",
                text.len()
            )));
        }
        Some(Value::String(text)) => StreamId::Text(text),
        Some(other) => {
            return Err(ServeError::Invalid(format!(
                "{SEQUENCE_ID} must be a positive integer or a string, not {other}"
            )));
        }
    };
    Ok(Some(Sequence { id, start, end }))
}

fn flag(value: Option<Value>, name: &str) -> Result<bool, ServeError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => Err(ServeError::Invalid(format!(
            "parameter '{name}' must be true or false, not {other}"
        ))),
    }
}

/// Checks a stream request's new rows, takes the stream's turn and turns
/// the request into the full-window request the model runs. The window
/// changes only when the returned turn is committed.
pub(crate) async fn open(
    version: &ModelVersion,
    sequence: Sequence,
    request: &mut InferRequest,
) -> Result<Turn, ServeError> {
    let store = version.streams().ok_or_else(|| {
        ServeError::Invalid(format!(
            "model '{}' does not keep streams ({})",
            version.name,
            if version.signature.inputs.len() == 1 {
                "its [stream] table sets enabled = false"
            } else {
                "streams need a model with one input of shape [T, F]"
            }
        ))
    })?;
    let shape = store.shape();
    let spec = &version.signature.inputs[0];
    let [input] = request.inputs.as_mut_slice() else {
        return Err(ServeError::Invalid(format!(
            "a stream request has one input, '{}'; this one has {}",
            spec.name,
            request.inputs.len()
        )));
    };
    if input.name != spec.name {
        return Err(ServeError::Invalid(format!(
            "unknown input '{}'; model '{}' takes '{}'",
            input.name, version.name, spec.name
        )));
    }
    if input.datatype != spec.datatype.as_str() {
        return Err(ServeError::Invalid(format!(
            "input '{}' has datatype {}; the model takes {}",
            input.name, input.datatype, spec.datatype
        )));
    }
    let rows = match input.shape.as_slice() {
        [1, k, f] if *f == shape.row_len as i64 && (1..=shape.rows as i64).contains(k) => {
            *k as usize
        }
        _ => {
            return Err(ServeError::Invalid(format!(
                "a stream request sends its new rows as shape [1, k, {f}] with 1 <= k <= {t}; input '{}' has shape {:?}",
                input.name,
                input.shape,
                f = shape.row_len,
                t = shape.rows,
            )));
        }
    };
    if input.data.len() != rows * shape.row_len {
        return Err(ServeError::Invalid(format!(
            "input '{}' has {} values; shape {:?} needs {}",
            input.name,
            input.data.len(),
            input.shape,
            rows * shape.row_len
        )));
    }
    if let Some(position) = input.data.iter().position(|v| !v.is_finite()) {
        return Err(ServeError::Invalid(format!(
            "input '{}' has a non-finite value at position {position} (NaN, infinity or out of FP32 range)",
            input.name
        )));
    }
    let new_rows = std::mem::take(&mut input.data);
    let mut turn = store
        .begin(sequence.id, sequence.start, sequence.end, new_rows)
        .await?;
    input.data = turn.take_input();
    input.shape = vec![1, shape.rows as i64, shape.row_len as i64];
    Ok(turn)
}

/// The version's stream store, when its config allows streams and its one
/// input is a window of T rows of F values.
pub(crate) fn store_for(
    entry: &ModelEntry,
    version: u64,
    signature: &Signature,
) -> Option<StreamStore> {
    let config = &entry.config.stream;
    match signature.inputs.as_slice() {
        [spec] if config.enabled && spec.dims.len() == 2 && spec.datatype == DataType::Fp32 => {
            Some(StreamStore::new(
                &entry.name,
                version,
                WindowShape {
                    rows: spec.dims[0],
                    row_len: spec.dims[1],
                },
                config.clone(),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(text: &str) -> serde_json::Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn sequence_parameters_are_read_and_removed() {
        let mut p = params(r#"{"sequence_id": 7, "sequence_start": true, "cache": false}"#);
        let sequence = take_sequence(&mut p).unwrap().unwrap();
        assert_eq!(sequence.id, StreamId::Number(7));
        assert!(sequence.start && !sequence.end);
        assert_eq!(p, params(r#"{"cache": false}"#));
        let mut p = params(r#"{"sequence_id": "EURUSD", "sequence_end": true}"#);
        let sequence = take_sequence(&mut p).unwrap().unwrap();
        assert_eq!(sequence.id, StreamId::Text("EURUSD".into()));
        assert!(!sequence.start && sequence.end);
        assert_eq!(
            take_sequence(&mut params(r#"{"cache": true}"#)).unwrap(),
            None
        );
    }

    #[test]
    fn bad_sequence_parameters_are_refused_with_a_reason() {
        for (text, needle) in [
            (r#"{"sequence_id": 0}"#, "positive integer"),
            (r#"{"sequence_id": -3}"#, "positive integer"),
            (r#"{"sequence_id": 1.5}"#, "positive integer"),
            (r#"{"sequence_id": ""}"#, "1 to 256 bytes"),
            (r#"{"sequence_id": true}"#, "positive integer or a string"),
            (r#"{"sequence_start": true}"#, "need a sequence_id"),
            (
                r#"{"sequence_id": 1, "sequence_end": "yes"}"#,
                "true or false",
            ),
        ] {
            let err = take_sequence(&mut params(text)).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
