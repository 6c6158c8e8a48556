//! The server's error type and its one mapping to HTTP statuses.
//!
//! Every failure a client can see is a [`ServeError`]; the engine's and the
//! scheduler's errors convert into it here, and [`ServeError::status`] is
//! the single place that decides the HTTP status, and
//! [`ServeError::grpc_code`] the one place that decides the gRPC code, so
//! both protocols answer the same failure the same way. Refusals under
//! load carry a retry hint: 429 for admission control and full priority
//! queues, 503 for an expired request timeout, both with `Retry-After`
//! (serving-systems.md §9.11). The body is always `{"error": "<message>"}`, as
//! the Open Inference Protocol specifies.

use axum::Json;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tickserve_scheduler::SchedulerError;
use tickserve_telemetry::error_type;

use crate::stream_store::StreamError;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ServeError {
    /// The request is malformed or does not fit the model.
    #[error("{0}")]
    Invalid(String),
    #[error("unknown model '{0}'")]
    ModelNotFound(String),
    #[error("model '{model}' has no version {version} (available: {available})")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },
    /// The body is larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Models are loading, or the server is draining.
    #[error("{0}")]
    NotReady(String),
    /// The queue is full: retry later or elsewhere.
    #[error("{0}")]
    Overloaded(String),
    /// Refused at arrival by admission control or a full priority queue:
    /// 429 with `Retry-After`. `reason` is the `error_type` label.
    #[error("{message}")]
    Rejected {
        message: String,
        reason: &'static str,
        retry_after: Duration,
    },
    /// The request's timeout expired before it reached the engine: 503
    /// with `Retry-After`.
    #[error("{message}")]
    TimedOut {
        message: String,
        retry_after: Duration,
    },
    /// The engine failed on a valid request.
    #[error("inference failed: {0}")]
    Internal(String),
    #[error("no route for {0}")]
    NoRoute(String),
    /// No valid bearer token (inference or admin routes).
    #[error("{0}")]
    Unauthorized(String),
    /// The client stopped sending its request body (body read timeout).
    #[error("{0}")]
    RequestTimeout(String),
    /// A stream request the stream's state refuses (docs/streams.md).
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::NoRoute(_) => StatusCode::NOT_FOUND,
            ServeError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::NotReady(_) | ServeError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServeError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServeError::Rejected { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServeError::TimedOut { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Stream(StreamError::Unknown { .. }) => StatusCode::NOT_FOUND,
            // The request is well formed; the stream is not ready for it.
            ServeError::Stream(StreamError::WarmingUp { .. }) => StatusCode::CONFLICT,
            ServeError::Stream(StreamError::Busy { .. }) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// When the client should retry, for refusals caused by load.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ServeError::Rejected { retry_after, .. } | ServeError::TimedOut { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// The gRPC code of the same failure, following the HTTP status:
    /// 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 404 → NOT_FOUND,
    /// 408 → DEADLINE_EXCEEDED,
    /// 413 and 429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE, 500 → INTERNAL,
    /// and a stream not yet full (HTTP 409) → FAILED_PRECONDITION.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ServeError::Invalid(_) => tonic::Code::InvalidArgument,
            ServeError::ModelNotFound(_) | ServeError::VersionNotFound { .. } => {
                tonic::Code::NotFound
            }
            ServeError::NoRoute(_) => tonic::Code::Unimplemented,
            ServeError::PayloadTooLarge(_) => tonic::Code::ResourceExhausted,
            ServeError::NotReady(_) | ServeError::Overloaded(_) => tonic::Code::Unavailable,
            // HTTP's 429: the client should back off or go elsewhere.
            ServeError::Rejected { .. } => tonic::Code::ResourceExhausted,
            // HTTP's 503 for an expired timeout.
            ServeError::TimedOut { .. } => tonic::Code::Unavailable,
            ServeError::Internal(_) => tonic::Code::Internal,
            ServeError::Unauthorized(_) => tonic::Code::Unauthenticated,
            ServeError::RequestTimeout(_) => tonic::Code::DeadlineExceeded,
            ServeError::Stream(StreamError::Unknown { .. }) => tonic::Code::NotFound,
            ServeError::Stream(StreamError::WarmingUp { .. }) => tonic::Code::FailedPrecondition,
            ServeError::Stream(StreamError::Busy { .. }) => tonic::Code::ResourceExhausted,
        }
    }

    /// The `error_type` label of the error metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::Invalid(_)
            | ServeError::PayloadTooLarge(_)
            | ServeError::Unauthorized(_)
            | ServeError::RequestTimeout(_) => error_type::INVALID,
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::NoRoute(_) => error_type::NOT_FOUND,
            ServeError::NotReady(_) => error_type::UNAVAILABLE,
            ServeError::Overloaded(_) => error_type::QUEUE_FULL,
            ServeError::Internal(_) => error_type::ENGINE,
            ServeError::Rejected { reason, .. } => reason,
            ServeError::TimedOut { .. } => error_type::TIMEOUT,
            ServeError::Stream(StreamError::Unknown { .. }) => error_type::NOT_FOUND,
            ServeError::Stream(StreamError::WarmingUp { .. }) => error_type::STREAM_WARMUP,
            ServeError::Stream(StreamError::Busy { .. }) => error_type::QUEUE_FULL,
        }
    }
}

impl From<SchedulerError> for ServeError {
    fn from(error: SchedulerError) -> Self {
        match error {
            SchedulerError::QueueFull { retry_after, .. } => ServeError::Rejected {
                message: error.to_string(),
                reason: error_type::QUEUE_FULL,
                retry_after,
            },
            SchedulerError::DeadlineUnmeetable { retry_after, .. } => ServeError::Rejected {
                message: error.to_string(),
                reason: error_type::DEADLINE,
                retry_after,
            },
            SchedulerError::Shed { retry_after, .. } => ServeError::Rejected {
                message: error.to_string(),
                reason: error_type::SHED,
                retry_after,
            },
            SchedulerError::TimeoutExpired { retry_after, .. } => ServeError::TimedOut {
                message: error.to_string(),
                retry_after,
            },
            SchedulerError::TimeoutNotAllowed(_) | SchedulerError::ZeroTimeout => {
                ServeError::Invalid(error.to_string())
            }
            SchedulerError::ShuttingDown { .. } => ServeError::NotReady(error.to_string()),
            SchedulerError::TooManyRows { .. } => ServeError::Invalid(error.to_string()),
            SchedulerError::Engine(e) => ServeError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(retry_after) = self.retry_after() {
            // Whole seconds, rounded up (RFC 9110 §10.2.3); the exact
            // figure is in the message.
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}

impl From<ServeError> for tonic::Status {
    fn from(error: ServeError) -> Self {
        tonic::Status::new(error.grpc_code(), error.to_string())
    }
}
