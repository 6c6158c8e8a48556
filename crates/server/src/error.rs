//! The server's error type and its one mapping to HTTP statuses.
//!
//! Every failure a client can see is a [`ServeError`]; the engine's and the
//! scheduler's errors convert into it here, and [`ServeError::status`] is
//! the single place that decides the HTTP status (gRPC will map the same
//! enum to its codes). The body is always `{"error": "<message>"}`, as
//! the Open Inference Protocol specifies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tickserve_scheduler::SchedulerError;
use tickserve_telemetry::error_type;

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
    /// The engine failed on a valid request.
    #[error("inference failed: {0}")]
    Internal(String),
    #[error("no route for {0}")]
    NoRoute(String),
    /// An admin endpoint without the right bearer token.
    #[error("{0}")]
    Unauthorized(String),
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
        }
    }

    /// The `error_type` label of the error metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::Invalid(_)
            | ServeError::PayloadTooLarge(_)
            | ServeError::Unauthorized(_) => error_type::INVALID,
            ServeError::ModelNotFound(_)
            | ServeError::VersionNotFound { .. }
            | ServeError::NoRoute(_) => error_type::NOT_FOUND,
            ServeError::NotReady(_) => error_type::UNAVAILABLE,
            ServeError::Overloaded(_) => error_type::QUEUE_FULL,
            ServeError::Internal(_) => error_type::ENGINE,
        }
    }
}

impl From<SchedulerError> for ServeError {
    fn from(error: SchedulerError) -> Self {
        match error {
            SchedulerError::QueueFull { .. } => ServeError::Overloaded(error.to_string()),
            SchedulerError::ShuttingDown { .. } => ServeError::NotReady(error.to_string()),
            SchedulerError::TooManyRows { .. } => ServeError::Invalid(error.to_string()),
            SchedulerError::Engine(e) => ServeError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        (self.status(), Json(body)).into_response()
    }
}
