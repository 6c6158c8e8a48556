//! Bearer-token authentication of the inference address, HTTP and gRPC.
//!
//! With `--auth-token` (one token) or `--auth-token-file` (one token a
//! line, so that an old and a new token can both be valid while clients
//! move over), every route of the inference address needs
//! `Authorization: Bearer <token>` (gRPC: the `authorization` metadata
//! key), except the health checks: `/v2/health/live`, `/v2/health/ready`,
//! the model readiness routes, gRPC `ServerLive`, `ServerReady`,
//! `ModelReady` and `grpc.health.v1`. The metrics address is not behind
//! it. Missing or wrong tokens get 401 / `UNAUTHENTICATED`.
//!
//! The tokens live behind an [`AuthHandle`]: the HTTP middleware and the
//! gRPC layer read the current set, [`AuthHandle::reload`] (the binary
//! calls it on SIGHUP) reads the file again and swaps the set at once, so
//! a rotated token is refused from the next request on. A failed reload
//! keeps the old set. Comparisons run in constant time (`subtle`) over
//! every configured token; tokens are never logged (their `Debug` is
//! redacted).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ServeError;

/// Where the tokens come from.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// One token, fixed for the life of the process.
    Token(String),
    /// A file of tokens, one a line (blank lines and lines starting with
    /// `#` ignored), read at start and again on every reload.
    File(PathBuf),
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthConfig::Token(_) => f.write_str("Token(***)"),
            AuthConfig::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// Why the tokens could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {0} holds no token")]
    Empty(PathBuf),
    #[error("the auth token is empty")]
    EmptyToken,
}

type Tokens = Arc<Vec<Box<[u8]>>>;

/// The current tokens, shared by HTTP and gRPC; cheap to clone.
#[derive(Clone)]
pub struct AuthHandle {
    config: Option<AuthConfig>,
    tokens: Arc<RwLock<Tokens>>,
}

impl std::fmt::Debug for AuthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthHandle")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn read_tokens(config: &AuthConfig) -> Result<Vec<Box<[u8]>>, AuthError> {
    match config {
        AuthConfig::Token(token) if token.is_empty() => Err(AuthError::EmptyToken),
        AuthConfig::Token(token) => Ok(vec![token.as_bytes().into()]),
        AuthConfig::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.clone(),
                source,
            })?;
            let tokens: Vec<Box<[u8]>> = text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(|line| line.as_bytes().into())
                .collect();
            if tokens.is_empty() {
                return Err(AuthError::Empty(path.clone()));
            }
            Ok(tokens)
        }
    }
}

impl AuthHandle {
    /// Authentication off: every request passes.
    pub fn off() -> Self {
        AuthHandle {
            config: None,
            tokens: Arc::new(RwLock::new(Arc::new(Vec::new()))),
        }
    }

    /// Reads the tokens; `None` turns authentication off.
    pub fn new(config: Option<AuthConfig>) -> Result<Self, AuthError> {
        let tokens = match &config {
            Some(config) => read_tokens(config)?,
            None => Vec::new(),
        };
        Ok(AuthHandle {
            config,
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// Reads the token file again and, if it holds at least one token,
    /// replaces the current set; returns how many tokens are now valid.
    /// On error the old set stays. A fixed `--auth-token` has nothing to
    /// reload.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let Some(config) = &self.config else {
            return Ok(0);
        };
        let tokens = Arc::new(read_tokens(config)?);
        let count = tokens.len();
        match self.tokens.write() {
            Ok(mut current) => *current = tokens,
            Err(poisoned) => *poisoned.into_inner() = tokens,
        }
        Ok(count)
    }

    fn current(&self) -> Tokens {
        match self.tokens.read() {
            Ok(tokens) => Arc::clone(&tokens),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Whether `given` is one of the tokens, compared in constant time
    /// against every token (only the lengths can show in the time taken).
    pub(crate) fn accepts(&self, given: &[u8]) -> bool {
        let mut matched = subtle::Choice::from(0u8);
        for token in self.current().iter() {
            matched |= token.as_ref().ct_eq(given);
        }
        bool::from(matched)
    }

    /// Checks the `Authorization: Bearer` header (HTTP header or gRPC
    /// metadata: both are HTTP/2 headers). Passes when authentication is
    /// off.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), ServeError> {
        if !self.enabled() {
            return Ok(());
        }
        match bearer(headers) {
            Some(given) if self.accepts(given) => Ok(()),
            Some(_) => Err(ServeError::Unauthorized(
                "the bearer token is not valid".into(),
            )),
            None => Err(ServeError::Unauthorized(
                "this server needs 'Authorization: Bearer <token>'".into(),
            )),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| value[7..].trim_ascii())
}

/// HTTP routes open without a token: the health checks, and the cache
/// admin routes, which check their own token (crate::cache_admin).
fn http_exempt(path: &str) -> bool {
    path == "/v2/health/live"
        || path == "/v2/health/ready"
        || path.starts_with("/v2/cache/")
        || (path.starts_with("/v2/models/") && path.ends_with("/ready"))
}

/// Axum middleware in front of every route of the inference address.
pub(crate) async fn http_middleware(
    State(auth): State<AuthHandle>,
    request: Request,
    next: Next,
) -> Response {
    if auth.enabled()
        && !http_exempt(request.uri().path())
        && let Err(error) = auth.check(request.headers())
    {
        return unauthorized_http(error);
    }
    next.run(request).await
}

fn unauthorized_http(error: ServeError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// gRPC methods open without a token: liveness and readiness.
fn grpc_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || matches!(
            path,
            "/inference.GRPCInferenceService/ServerLive"
                | "/inference.GRPCInferenceService/ServerReady"
                | "/inference.GRPCInferenceService/ModelReady"
        )
}

/// Tower layer in front of tonic's router: refuses calls without a valid
/// token with `UNAUTHENTICATED` before any message is decoded.
#[derive(Debug, Clone)]
pub(crate) struct GrpcAuthLayer {
    pub(crate) auth: AuthHandle,
}

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct GrpcAuth<S> {
    inner: S,
    auth: AuthHandle,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        if self.auth.enabled()
            && !grpc_exempt(request.uri().path())
            && let Err(error) = self.auth.check(request.headers())
        {
            let status = tonic::Status::from(error);
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_token_is_accepted_and_others_refused() {
        let auth = AuthHandle::new(Some(AuthConfig::Token("s3cret".into()))).unwrap();
        assert!(auth.check(&headers("Bearer s3cret")).is_ok());
        assert!(auth.check(&headers("bearer s3cret")).is_ok());
        assert!(auth.check(&headers("Bearer s3cre")).is_err());
        assert!(auth.check(&headers("Bearer s3cret2")).is_err());
        assert!(auth.check(&headers("Basic s3cret")).is_err());
        assert!(auth.check(&HeaderMap::new()).is_err());
        assert_eq!(
            auth.check(&HeaderMap::new()).unwrap_err().grpc_code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn off_lets_everything_through() {
        let auth = AuthHandle::new(None).unwrap();
        assert!(!auth.enabled());
        assert!(auth.check(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn a_token_file_rotates_on_reload_and_keeps_the_old_set_on_error() {
        let path = std::env::temp_dir().join(format!("tickserve-tokens-{}", std::process::id()));
        std::fs::write(&path, "# rotated weekly\nold\n\nnew\n").unwrap();
        let auth = AuthHandle::new(Some(AuthConfig::File(path.clone()))).unwrap();
        assert!(auth.accepts(b"old") && auth.accepts(b"new"));
        assert!(!auth.accepts(b"# rotated weekly"));
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert!(!auth.accepts(b"old") && auth.accepts(b"new"));
        std::fs::write(&path, "\n# nothing\n").unwrap();
        assert!(matches!(auth.reload(), Err(AuthError::Empty(_))));
        assert!(auth.accepts(b"new"), "a failed reload keeps the old tokens");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tokens_do_not_show_in_debug_output() {
        let config = AuthConfig::Token("s3cret".into());
        let auth = AuthHandle::new(Some(config.clone())).unwrap();
        assert!(!format!("{config:?} {auth:?}").contains("s3cret"));
    }

    #[test]
    fn health_routes_are_exempt_and_the_rest_is_not() {
        assert!(http_exempt("/v2/health/ready"));
        assert!(http_exempt("/v2/models/cnn_lstm/ready"));
        assert!(http_exempt("/v2/models/cnn_lstm/versions/1/ready"));
        assert!(!http_exempt("/v2/models/cnn_lstm/infer"));
        assert!(!http_exempt("/v2/repository/index"));
        assert!(!http_exempt("/v2"));
        assert!(grpc_exempt("/grpc.health.v1.Health/Check"));
        assert!(!grpc_exempt("/inference.GRPCInferenceService/ModelInfer"));
    }
}
