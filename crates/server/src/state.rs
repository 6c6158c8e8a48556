//! [`AppState`]: what every HTTP handler and the gRPC service share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tickserve_telemetry::throughput::Throughput;

use crate::ServerConfig;
use crate::auth::AuthHandle;
use crate::cached::CacheLayer;
use crate::decode_pool::DecodePool;
use crate::error::ServeError;
use crate::registry::ModelRegistry;
use crate::sla::SlaMonitor;

/// State shared by every handler; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// Set once every model is loaded and warmed up.
    registry: Arc<OnceLock<ModelRegistry>>,
    draining: Arc<AtomicBool>,
    pub(crate) max_body_bytes: usize,
    pub(crate) limits: crate::Limits,
    /// Rolling-window SLA view (`GET /v2/sla`, `GET /dashboard`).
    pub(crate) sla: Arc<SlaMonitor>,
    /// Completed requests per second (`batch_processing_throughput_rps`).
    pub(crate) throughput: Arc<Throughput>,
    pub(crate) cache: Option<Arc<CacheLayer>>,
    pub(crate) admin_token: Option<Arc<str>>,
    /// Bearer tokens of the inference address (crate::auth).
    pub(crate) auth: AuthHandle,
    /// Where background requests' bodies are decoded; `None`: on the
    /// runtime (crate::decode_pool).
    pub(crate) decode_pool: Option<DecodePool>,
}

impl AppState {
    /// State with no registry yet (readiness answers 503 until
    /// [`Self::set_registry`]).
    pub(crate) fn new(config: &ServerConfig, cache: Option<Arc<CacheLayer>>) -> Self {
        AppState {
            registry: Arc::new(OnceLock::new()),
            draining: Arc::new(AtomicBool::new(false)),
            max_body_bytes: config.max_body_bytes,
            limits: config.limits,
            sla: Arc::new(SlaMonitor::new()),
            throughput: Arc::new(Throughput::new(std::time::Instant::now())),
            cache,
            admin_token: config.admin_token.as_ref().map(|t| Arc::from(t.expose())),
            auth: AuthHandle::off(),
            decode_pool: DecodePool::start(config.decode),
        }
    }

    /// The same state with these bearer tokens required.
    pub(crate) fn with_auth(mut self, auth: AuthHandle) -> Self {
        self.auth = auth;
        self
    }

    pub(crate) fn registry(&self) -> Result<&ModelRegistry, ServeError> {
        self.registry.get().ok_or_else(|| {
            ServeError::NotReady("the server is starting: models are still loading".into())
        })
    }

    /// Publishes the loaded models; the first call wins.
    pub(crate) fn set_registry(&self, registry: ModelRegistry) {
        let _ = self.registry.set(registry);
    }

    /// Readiness turns 503 for good: shutdown has begun.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.registry.get().is_some() && !self.is_draining()
    }
}
