//! The Redis tier: reads with a per-operation timeout behind a circuit
//! breaker, writes through a bounded write-behind queue.
//!
//! ```text
//!  lookup ──(breaker allows?)── GET+PTTL pipeline ──timeout──▶ hits / None
//!  store  ──try_send──▶ [bounded queue] ──writer task──▶ SET key value PX ttl (pipelined)
//!  connection: created in the background (never on a request's path);
//!              redis-rs' ConnectionManager reconnects a broken one itself,
//!              and an opened breaker drops it so the next probe starts fresh.
//! ```
//!
//! Redis is an optimisation: every failure here is logged, counted and
//! reported as "no answer from L2", never as a failed request.
//!
//! `rediss://` URLs use TLS through rustls (no OpenSSL to link): the
//! system's roots by default, or the private CA of [`RedisTls`], and a
//! client certificate for Redis servers that require one
//! (`tls-auth-clients yes`). A certificate the CA does not vouch for is a
//! connection failure like any other: logged, counted, breaker open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, IntoConnectionInfo, Value};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerState};
use crate::codec::{self, RowOutputs};
use crate::key::CacheKey;
use crate::sync::lock;

/// TLS material for `rediss://` URLs, as PEM text (read from files at
/// start-up by the binary). `Debug` shows only which parts are present.
#[derive(Clone, Default, PartialEq)]
pub struct RedisTls {
    /// Certificates to trust instead of the system's roots: the private CA
    /// that signed the Redis server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and key, for mutual TLS.
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, PEM.
#[derive(Clone, PartialEq)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

impl RedisTls {
    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client.is_none()
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("private_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// Settings of the Redis tier. `Debug` hides the URL's password and the
/// TLS key.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port`, or `rediss://…` for TLS; the
    /// database in the URL is replaced by `db`.
    pub url: String,
    /// Private CA and client certificate for `rediss://`.
    pub tls: RedisTls,
    pub db: i64,
    /// Prepended to every key: `<prefix><model>:<32 hex digits>`.
    pub key_prefix: String,
    /// Entry lifetime in Redis; `None` uses each model's cache TTL.
    pub ttl: Option<Duration>,
    /// Longest one read or write may take before it counts as a failure.
    pub timeout: Duration,
    /// Longest a (background) connection attempt may take.
    pub connect_timeout: Duration,
    /// Writes that may wait for the writer task; more are dropped.
    pub write_queue: usize,
    /// Consecutive failures that open the circuit breaker.
    pub failure_threshold: u32,
    /// How long an open breaker keeps Redis out before probing it.
    pub open_for: Duration,
}

/// The URL with anything between `://` and `@` (user and password)
/// replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls)
            .field("db", &self.db)
            .field("key_prefix", &self.key_prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("write_queue", &self.write_queue)
            .field("failure_threshold", &self.failure_threshold)
            .field("open_for", &self.open_for)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            tls: RedisTls::default(),
            db: 1,
            key_prefix: "tickserve:".into(),
            ttl: None,
            timeout: Duration::from_millis(5),
            connect_timeout: Duration::from_millis(500),
            write_queue: 4096,
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("invalid Redis URL: {0}")]
    Url(String),
    #[error("invalid Redis TLS settings: {0}")]
    Tls(String),
    #[error("Redis is unavailable (circuit {0})")]
    Unavailable(&'static str),
    #[error("Redis operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

struct Write {
    key: String,
    value: Vec<u8>,
    ttl: Duration,
}

/// A row found in Redis and how long it still lives there.
#[derive(Debug, Clone)]
pub struct L2Hit {
    pub row: RowOutputs,
    pub remaining: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct L2Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub writes_dropped: AtomicU64,
    /// The latest failure, for the stats endpoint: what an operator reads
    /// first when the circuit is open (a refused certificate, a wrong
    /// password, a timeout).
    pub last_error: Mutex<Option<String>>,
}

/// Cloneable handle to the Redis tier.
#[derive(Clone)]
pub struct L2 {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    connecting: AtomicBool,
    breaker: Mutex<Breaker>,
    writes: mpsc::Sender<Write>,
    counters: L2Counters,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("db", &self.inner.config.db)
            .field("key_prefix", &self.inner.config.key_prefix)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// `glob`-escapes a model name for SCAN MATCH.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Redis client for `config`: plain, TLS with the system's roots, or
/// TLS with a private CA and/or a client certificate.
fn client(config: &RedisConfig) -> Result<redis::Client, L2Error> {
    let mut info: ConnectionInfo = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| L2Error::Url(e.to_string()))?;
    info.redis.db = config.db;
    let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
    if tls {
        // rustls needs a process-wide crypto provider; ring is the only
        // one built in. Already installed (by us or anyone) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    if config.tls.is_empty() {
        return redis::Client::open(info).map_err(|e| L2Error::Url(e.to_string()));
    }
    if !tls {
        return Err(L2Error::Tls(
            "a CA or client certificate is set but the URL is not rediss://".into(),
        ));
    }
    // redis-rs skips text that is not PEM; an empty trust store would
    // only show up as refused handshakes later, so refuse it now.
    let certificates_in = |pem: &[u8]| {
        CertificateDer::pem_slice_iter(pem)
            .filter(Result::is_ok)
            .count()
    };
    if let Some(ca) = &config.tls.ca_pem
        && certificates_in(ca) == 0
    {
        return Err(L2Error::Tls("the CA file holds no PEM certificate".into()));
    }
    if let Some(identity) = &config.tls.client {
        if certificates_in(&identity.cert_pem) == 0 {
            return Err(L2Error::Tls(
                "the client certificate file holds no PEM certificate".into(),
            ));
        }
        PrivateKeyDer::from_pem_slice(&identity.key_pem).map_err(|e| {
            L2Error::Tls(format!("the client key file holds no PEM private key: {e}"))
        })?;
    }
    let certificates = redis::TlsCertificates {
        client_tls: config
            .tls
            .client
            .as_ref()
            .map(|identity| redis::ClientTlsConfig {
                client_cert: identity.cert_pem.clone(),
                client_key: identity.key_pem.clone(),
            }),
        root_cert: config.tls.ca_pem.clone(),
    };
    redis::Client::build_with_tls(info, certificates).map_err(|e| L2Error::Tls(e.to_string()))
}

impl L2 {
    /// Builds the tier and starts its writer task on the current runtime.
    /// Does not connect: the first lookup starts a background connection.
    pub fn start(config: RedisConfig) -> Result<Self, L2Error> {
        let client = client(&config)?;
        let (tx, rx) = mpsc::channel(config.write_queue.max(1));
        let inner = Arc::new(Inner {
            breaker: Mutex::new(Breaker::new(config.failure_threshold, config.open_for)),
            config,
            client,
            connection: Mutex::new(None),
            connecting: AtomicBool::new(false),
            writes: tx,
            counters: L2Counters::default(),
        });
        gauge!(telemetry::CACHE_REDIS_CIRCUIT).set(BreakerState::Closed.gauge());
        tokio::spawn(writer(Arc::downgrade(&inner), rx));
        let l2 = L2 { inner };
        l2.ensure_connection();
        Ok(l2)
    }

    pub fn state(&self) -> BreakerState {
        lock(&self.inner.breaker).state()
    }

    pub(crate) fn counters(&self) -> &L2Counters {
        &self.inner.counters
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    fn redis_key(&self, model: &str, key: CacheKey) -> String {
        format!("{}{model}:{key}", self.inner.config.key_prefix)
    }

    /// A connection if one is up and the breaker lets us use it.
    fn connection(&self) -> Option<ConnectionManager> {
        if !self.inner.allow() {
            return None;
        }
        let connection = lock(&self.inner.connection).clone();
        if connection.is_none() {
            self.ensure_connection();
        }
        connection
    }

    /// Starts one background connection attempt unless one is running.
    fn ensure_connection(&self) {
        if self.inner.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            // One attempt: retrying is the breaker's job (a probe per
            // `open_for`), and a single attempt ends with its own error (a
            // refused certificate, a wrong password) instead of the
            // connect timeout that retries would run into.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(inner.config.connect_timeout)
                .set_number_of_retries(0)
                .set_max_delay(inner.config.open_for.as_millis() as u64);
            let connect = async {
                let mut manager =
                    ConnectionManager::new_with_config(inner.client.clone(), config).await?;
                redis::cmd("PING")
                    .query_async::<()>(&mut manager)
                    .await
                    .map(|()| manager)
            };
            match tokio::time::timeout(inner.config.connect_timeout, connect).await {
                Ok(Ok(manager)) => {
                    *lock(&inner.connection) = Some(manager);
                    inner.succeeded();
                    tracing::info!(db = inner.config.db, "connected to Redis");
                }
                Ok(Err(e)) => inner.failed("connect", &L2Error::Redis(e)),
                Err(_) => inner.failed("connect", &L2Error::Timeout(inner.config.connect_timeout)),
            }
            inner.connecting.store(false, Ordering::Release);
        });
    }

    /// Looks `keys` up; `None` when Redis could not answer (down, slow,
    /// breaker open). Undecodable values count as misses.
    pub async fn get_many(&self, model: &str, keys: &[CacheKey]) -> Option<Vec<Option<L2Hit>>> {
        let mut connection = self.connection()?;
        let mut pipe = redis::pipe();
        for &key in keys {
            let key = self.redis_key(model, key);
            pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        }
        let timeout = self.inner.config.timeout;
        let started = std::time::Instant::now();
        let answer =
            tokio::time::timeout(timeout, pipe.query_async::<Vec<Value>>(&mut connection)).await;
        // Failed and timed-out lookups too: they are what a slow Redis
        // costs a request. Skipped ones (breaker open) cost nothing.
        histogram!(telemetry::CACHE_LOOKUP, "tier" => "l2").record(started.elapsed().as_secs_f64());
        let values = match answer {
            Ok(Ok(values)) if values.len() == 2 * keys.len() => values,
            Ok(Ok(values)) => {
                let error = L2Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "unexpected pipeline answer length",
                    values.len().to_string(),
                )));
                self.inner.failed("get", &error);
                return None;
            }
            Ok(Err(e)) => {
                self.inner.failed("get", &L2Error::Redis(e));
                return None;
            }
            Err(_) => {
                self.inner.failed("get", &L2Error::Timeout(timeout));
                return None;
            }
        };
        self.inner.succeeded();
        let hits: Vec<Option<L2Hit>> = values
            .chunks_exact(2)
            .map(|pair| {
                let (Value::BulkString(bytes), Value::Int(ms)) = (&pair[0], &pair[1]) else {
                    return None;
                };
                // PTTL is -1 for a key without expiry (written by someone
                // else) and -2 for one that expired in between.
                if *ms < 0 && *ms != -1 {
                    return None;
                }
                match codec::decode(bytes) {
                    Ok(row) => Some(L2Hit {
                        row,
                        remaining: Duration::from_millis((*ms).max(0) as u64),
                    }),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an undecodable Redis cache value");
                        None
                    }
                }
            })
            .collect();
        let found = hits.iter().filter(|h| h.is_some()).count() as u64;
        let counters = &self.inner.counters;
        counters.hits.fetch_add(found, Ordering::Relaxed);
        counters
            .misses
            .fetch_add(keys.len() as u64 - found, Ordering::Relaxed);
        counter!(telemetry::CACHE_HITS, "model" => model.to_owned(), "tier" => "l2")
            .increment(found);
        counter!(telemetry::CACHE_MISSES, "model" => model.to_owned(), "tier" => "l2")
            .increment(keys.len() as u64 - found);
        Some(hits)
    }

    /// Queues a write; never waits. Dropped (and counted) when the queue
    /// is full.
    pub fn put(&self, model: &str, key: CacheKey, row: &RowOutputs, model_ttl: Duration) {
        let ttl = self.inner.config.ttl.unwrap_or(model_ttl);
        let write = Write {
            key: self.redis_key(model, key),
            value: codec::encode(row),
            ttl,
        };
        if self.inner.writes.try_send(write).is_err() {
            self.inner.dropped(1);
        }
    }

    /// Deletes every key of `model` (all versions). Returns how many.
    /// Admin path: waits for Redis, bounded by a generous timeout.
    pub async fn clear_model(&self, model: &str) -> Result<u64, L2Error> {
        let Some(mut connection) = self.connection() else {
            return Err(L2Error::Unavailable(self.state().as_str()));
        };
        let pattern = format!(
            "{}{}:*",
            escape_glob(&self.inner.config.key_prefix),
            escape_glob(model)
        );
        let limit = Duration::from_secs(10).max(self.inner.config.timeout);
        let work = async {
            let mut cursor: u64 = 0;
            let mut deleted = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut connection)
                    .await?;
                if !keys.is_empty() {
                    let n: u64 = redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async(&mut connection)
                        .await?;
                    deleted += n;
                }
                if next == 0 {
                    return Ok::<_, redis::RedisError>(deleted);
                }
                cursor = next;
            }
        };
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(deleted)) => Ok(deleted),
            Ok(Err(e)) => Err(L2Error::Redis(e)),
            Err(_) => Err(L2Error::Timeout(limit)),
        }
    }
}

impl Inner {
    fn allow(&self) -> bool {
        let mut breaker = lock(&self.breaker);
        let before = breaker.state();
        let allowed = breaker.allow(Instant::now());
        if breaker.state() != before {
            gauge!(telemetry::CACHE_REDIS_CIRCUIT).set(breaker.state().gauge());
            tracing::info!("Redis circuit half-open: probing Redis");
        }
        allowed
    }

    fn succeeded(&self) {
        let changed = lock(&self.breaker).success(Instant::now());
        if changed.is_some() {
            gauge!(telemetry::CACHE_REDIS_CIRCUIT).set(BreakerState::Closed.gauge());
            tracing::info!("Redis is back: circuit closed, L2 cache in use again");
        }
    }

    fn failed(&self, operation: &'static str, error: &L2Error) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.counters.last_error) = Some(format!("{operation}: {error}"));
        counter!(telemetry::CACHE_REDIS_ERRORS, "operation" => operation).increment(1);
        let changed = lock(&self.breaker).failure(Instant::now());
        if changed.is_some() {
            gauge!(telemetry::CACHE_REDIS_CIRCUIT).set(BreakerState::Open.gauge());
            // A fresh connection on the next probe, whatever state the old
            // one's reconnect logic is in.
            *lock(&self.connection) = None;
            tracing::warn!(
                operation,
                %error,
                open_for = ?self.config.open_for,
                "Redis failing: circuit open, serving from memory and the engine"
            );
        } else {
            tracing::debug!(operation, %error, "Redis operation failed");
        }
    }

    fn dropped(&self, n: u64) {
        self.counters.writes_dropped.fetch_add(n, Ordering::Relaxed);
        counter!(telemetry::CACHE_REDIS_WRITES_DROPPED).increment(n);
    }
}

/// Most writes sent in one pipeline.
const WRITE_BATCH: usize = 64;

/// Drains the write-behind queue, a pipeline of `SET key value PX ttl`
/// at a time. Ends when the cache is dropped.
async fn writer(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        let l2 = L2 { inner };
        let Some(mut connection) = l2.connection() else {
            l2.inner.dropped(batch.len() as u64);
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for write in &batch {
            let ms = write.ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
            pipe.cmd("SET")
                .arg(&write.key)
                .arg(&write.value)
                .arg("PX")
                .arg(ms)
                .ignore();
        }
        let timeout = l2.inner.config.timeout;
        match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => l2.inner.succeeded(),
            Ok(Err(e)) => {
                l2.inner.failed("set", &L2Error::Redis(e));
                l2.inner.dropped(batch.len() as u64);
            }
            Err(_) => {
                l2.inner.failed("set", &L2Error::Timeout(timeout));
                l2.inner.dropped(batch.len() as u64);
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_in_model_names_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(escape_glob("cnn_lstm"), "cnn_lstm");
    }

    #[test]
    fn tls_material_needs_a_rediss_url_and_must_parse() {
        let with = |url: &str, tls: RedisTls| {
            client(&RedisConfig {
                url: url.into(),
                tls,
                ..RedisConfig::default()
            })
        };
        assert!(with("rediss://127.0.0.1:6380", RedisTls::default()).is_ok());
        let ca = RedisTls {
            ca_pem: Some(b"not a certificate".to_vec()),
            client: None,
        };
        let err = with("redis://127.0.0.1:6379", ca.clone()).unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
        assert!(matches!(
            with("rediss://127.0.0.1:6380", ca),
            Err(L2Error::Tls(_))
        ));
        let shown = format!(
            "{:?}",
            RedisConfig {
                tls: RedisTls {
                    ca_pem: None,
                    client: Some(ClientIdentity {
                        cert_pem: b"CERT".to_vec(),
                        key_pem: b"SECRET KEY".to_vec(),
                    }),
                },
                ..RedisConfig::default()
            }
        );
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("client_certificate: true"), "{shown}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:pw@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
