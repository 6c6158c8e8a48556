//! Request tracing at the edge: the W3C trace context a client sends, the
//! request's root span, and the ids the answer carries back.
//!
//! ```text
//!  traceparent / tracestate / x-request-id (HTTP headers or gRPC metadata)
//!   ─▶ RequestTrace::start: `infer` span, parent = the caller's span when
//!      the traceparent is valid, else a new trace
//!   ─▶ crate::infer under that span: decode, cache, queue, engine spans
//!   ─▶ encode span ─▶ answer (or error) + traceparent + x-request-id
//! ```
//!
//! The spans go out over OTLP only when the export is on
//! (tickserve_telemetry::traces); the response ids are there either way,
//! so a client can quote them in logs and bug reports. With the export
//! off the ids come from the same random generator the SDK uses and
//! nothing else is recorded.

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tickserve_telemetry::traces::TRACE_TARGET;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The front end a request came through: the `source` label of its
/// metrics and the protocol of its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// W3C trace context header (request and response).
pub const TRACEPARENT: &str = "traceparent";
/// W3C vendor trace state, passed on to the SDK with the traceparent.
pub const TRACESTATE: &str = "tracestate";
/// The request's id: the client's, else a new one.
pub const REQUEST_ID: &str = "x-request-id";
/// Longest client request id echoed; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The trace context headers of one request, as text.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Incoming<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl<'a> Incoming<'a> {
    pub(crate) fn from_http(headers: &'a HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Incoming {
            traceparent: text(TRACEPARENT),
            tracestate: text(TRACESTATE),
            request_id: text(REQUEST_ID),
        }
    }

    pub(crate) fn from_grpc(metadata: &'a tonic::metadata::MetadataMap) -> Self {
        let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
        Incoming {
            traceparent: text(TRACEPARENT),
            tracestate: text(TRACESTATE),
            request_id: text(REQUEST_ID),
        }
    }
}

impl Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent,
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The caller's span context from a `traceparent` (and `tracestate`), or
/// `None` when it is absent or invalid: wrong field lengths, non-hex or
/// upper-case digits, version `ff`, an all-zero trace or parent id. A
/// version above 00 is read as 00 (the W3C rule for future versions).
pub(crate) fn parse(incoming: &Incoming<'_>) -> Option<SpanContext> {
    let value = incoming.traceparent?.trim();
    // The SDK's parser takes ids of any length up to the maximum; the W3C
    // format has fixed widths.
    let mut fields = value.split('-');
    let widths_ok = [2, 32, 16, 2]
        .iter()
        .all(|&width| fields.next().is_some_and(|f| f.len() == width));
    if !widths_ok {
        return None;
    }
    let context = TraceContextPropagator::new().extract(incoming);
    let span = context.span();
    let parent = span.span_context();
    parent.is_valid().then(|| parent.clone())
}

/// The trace of one inference request: its root span and the ids its
/// answer carries.
#[derive(Debug)]
pub(crate) struct RequestTrace {
    span: Span,
    traceparent: String,
    request_id: String,
}

impl RequestTrace {
    /// Opens the request's `infer` span, a child of the caller's span when
    /// `incoming` has a valid traceparent, else the root of a new trace.
    pub(crate) fn start(protocol: Protocol, incoming: &Incoming<'_>) -> Self {
        let parent = parse(incoming);
        let request_id = match incoming.request_id {
            Some(id) if !id.is_empty() && id.len() <= MAX_REQUEST_ID => id.to_owned(),
            _ => format!("{:032x}", RandomIdGenerator::default().new_trace_id()),
        };
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "infer",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            protocol = protocol.label(),
            request_id = %request_id,
            model = tracing::field::Empty,
            model_version = tracing::field::Empty,
            priority = tracing::field::Empty,
            rows = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let Some(parent) = &parent {
            // Fails only when the span is not exported; the ids below are
            // then made here.
            let _ = span
                .set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
        }
        let exported = span.context().span().span_context().clone();
        let traceparent = if exported.is_valid() {
            format_traceparent(&exported)
        } else {
            let ids = RandomIdGenerator::default();
            let trace_id = parent
                .as_ref()
                .map_or_else(|| ids.new_trace_id(), SpanContext::trace_id);
            let flags = parent
                .as_ref()
                .map_or(TraceFlags::default(), SpanContext::trace_flags);
            format!("00-{trace_id}-{}-{:02x}", ids.new_span_id(), flags.to_u8())
        };
        RequestTrace {
            span,
            traceparent,
            request_id,
        }
    }

    /// The request's `infer` span.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Runs `encode` in an `encode` span under the request's span.
    pub(crate) fn encode<T>(&self, encode: impl FnOnce() -> T) -> T {
        tracing::info_span!(target: TRACE_TARGET, parent: &self.span, "encode").in_scope(encode)
    }

    /// The ids an answer carries, by header (or parameter) name.
    pub(crate) fn ids(&self) -> [(&'static str, &str); 2] {
        [
            (TRACEPARENT, &self.traceparent),
            (REQUEST_ID, &self.request_id),
        ]
    }

    /// Adds `traceparent` and `x-request-id` to HTTP response headers.
    pub(crate) fn tag_http(&self, headers: &mut HeaderMap) {
        for (name, value) in self.ids() {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
    }

    /// Adds `traceparent` and `x-request-id` to gRPC response metadata.
    pub(crate) fn tag_grpc(&self, metadata: &mut tonic::metadata::MetadataMap) {
        for (name, value) in self.ids() {
            if let Ok(value) = value.parse() {
                metadata.insert(name, value);
            }
        }
    }
}

fn format_traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// Records what the request was and how it ended on its span (the
/// current one).
pub(crate) fn record_request(
    (model, version): (&str, &str),
    priority: Option<u8>,
    rows: usize,
    outcome: &str,
    server_error: bool,
) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("model", model);
    span.record("model_version", version);
    if let Some(priority) = priority {
        span.record("priority", priority);
    }
    span.record("rows", rows);
    record_outcome(outcome, server_error);
}

/// Records how the request ended on its span (the current one): `outcome`
/// is `success` or the error kind; a server-side failure also marks the
/// span as an error.
pub(crate) fn record_outcome(outcome: &str, server_error: bool) {
    let span = Span::current();
    span.record("outcome", outcome);
    if server_error {
        span.record("otel.status_code", "error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT: &str = "b7ad6b7169203331";

    fn parsed(traceparent: &str) -> Option<SpanContext> {
        parse(&Incoming {
            traceparent: Some(traceparent),
            ..Incoming::default()
        })
    }

    #[test]
    fn a_valid_traceparent_gives_the_callers_ids_and_flags() {
        let context = parsed(&format!("00-{TRACE}-{PARENT}-01")).expect("valid");
        assert_eq!(context.trace_id().to_string(), TRACE);
        assert_eq!(context.span_id().to_string(), PARENT);
        assert!(context.is_sampled());
        assert!(context.is_remote());
        let unsampled = parsed(&format!("00-{TRACE}-{PARENT}-00")).expect("valid");
        assert!(!unsampled.is_sampled());
        // A future version is read as version 00, extra fields ignored.
        assert!(parsed(&format!("01-{TRACE}-{PARENT}-01-extra")).is_some());
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("00-{TRACE}-{PARENT}"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            // Short ids, which the SDK alone would accept.
            format!("00-{}-{PARENT}-01", &TRACE[..31]),
            format!("00-{TRACE}-{}-01", &PARENT[..15]),
            format!("00-{}-{PARENT}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{PARENT}-0x"),
            format!("00-{}-{PARENT}-01", "g".repeat(32)),
        ] {
            assert!(parsed(&bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn version_ff_and_all_zero_ids_are_invalid() {
        assert!(parsed(&format!("ff-{TRACE}-{PARENT}-01")).is_none());
        assert!(parsed(&format!("00-{}-{PARENT}-01", "0".repeat(32))).is_none());
        assert!(parsed(&format!("00-{TRACE}-{}-01", "0".repeat(16))).is_none());
    }

    #[test]
    fn without_export_the_answer_keeps_the_callers_trace_and_request_id() {
        // No subscriber exports here: the ids are made by RequestTrace.
        let incoming = Incoming {
            traceparent: Some(&format!("00-{TRACE}-{PARENT}-01")),
            tracestate: None,
            request_id: Some("order-42"),
        };
        let trace = RequestTrace::start(Protocol::Http, &incoming);
        let mut headers = HeaderMap::new();
        trace.tag_http(&mut headers);
        let fields: Vec<&str> = headers[TRACEPARENT].to_str().unwrap().split('-').collect();
        assert_eq!(fields[0], "00");
        assert_eq!(fields[1], TRACE);
        assert_ne!(fields[2], PARENT, "the answer names the server's span");
        assert_eq!(fields[2].len(), 16);
        assert_eq!(fields[3], "01");
        assert_eq!(headers[REQUEST_ID], "order-42");

        let fresh = RequestTrace::start(Protocol::Grpc, &Incoming::default());
        let mut metadata = tonic::metadata::MetadataMap::new();
        fresh.tag_grpc(&mut metadata);
        let traceparent = metadata.get(TRACEPARENT).unwrap().to_str().unwrap();
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields.len(), 4);
        assert_eq!(fields[1].len(), 32);
        assert_ne!(fields[1], "0".repeat(32));
        let request_id = metadata.get(REQUEST_ID).unwrap().to_str().unwrap();
        assert_eq!(request_id.len(), 32);
        assert_ne!(request_id, fields[1]);
    }
}
