//! `tickserve serve` settings: clap flags with `TICKSERVE_*` environment
//! variables, an optional TOML file, and defaults, merged in that order of
//! precedence into the server's plain [`ServerConfig`].
//!
//! Flags are `Option`s without clap defaults so that a value from the TOML
//! file is not hidden by a default; defaults are applied last, here, and
//! stated in each flag's help.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use tickserve_scheduler::os_thread;
use tickserve_server::{
    AdminToken, CacheConfig, ClientIdentity, ControlMode, DecodeConfig, ModelControl, RedisConfig,
    RedisTls, ServerConfig,
};
use tickserve_telemetry::LogFormat;
use tickserve_telemetry::traces::OtlpConfig;

use crate::security::{read_cert_and_key, read_pem};

const DEFAULT_REPOSITORY: &str = "models";
const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8000";
const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8001";
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:8002";
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_REQUEST_SLICE: Duration = Duration::from_micros(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatArg {
    Text,
    Json,
}

/// `--model-control-mode`: which models are loaded and who changes that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelControlArg {
    /// Every model at start; no changes while running.
    None,
    /// Every model at start; the repository is re-read every poll interval
    /// and changed models are swapped in without dropping a request.
    Poll,
    /// The --load-model models at start; the repository load/unload
    /// endpoints change the set.
    Explicit,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the long flags,
    /// with underscores: `model_repository = "models"`). Flags and
    /// environment variables override it.
    #[arg(long, env = "TICKSERVE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Model repository: <dir>/<model>/config.toml and
    /// <dir>/<model>/<version>/model.onnx. [default: models]
    #[arg(long, env = "TICKSERVE_MODEL_REPOSITORY", value_name = "DIR")]
    pub model_repository: Option<PathBuf>,

    /// Address of the Open Inference Protocol HTTP API. [default: 127.0.0.1:8000]
    #[arg(long, env = "TICKSERVE_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// Address of the Open Inference Protocol gRPC service
    /// (inference.GRPCInferenceService and grpc.health.v1). [default: 127.0.0.1:8001]
    #[arg(long, env = "TICKSERVE_GRPC_ADDR", value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,

    /// Address of the Prometheus endpoint (GET /metrics). [default: 127.0.0.1:8002]
    #[arg(long, env = "TICKSERVE_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Address of a second HTTP listener for real-time clients: the same
    /// API, read and answered by a thread of its own, so that its requests
    /// never wait behind the connections of a background flood on the main
    /// address (docs/scheduling.md). [default: none]
    #[arg(long, env = "TICKSERVE_REALTIME_HTTP_ADDR", value_name = "ADDR")]
    pub realtime_http_addr: Option<SocketAddr>,

    /// The same for gRPC: a second address of the gRPC service, served on
    /// the real-time listeners' thread. [default: none]
    #[arg(long, env = "TICKSERVE_REALTIME_GRPC_ADDR", value_name = "ADDR")]
    pub realtime_grpc_addr: Option<SocketAddr>,

    /// Runs the threads a real-time request passes through under the
    /// SCHED_FIFO policy at this priority (1-99, Linux, needs
    /// CAP_SYS_NICE): the async runtime's threads, the real-time
    /// listeners' thread, each model's batcher thread and the engine
    /// workers reserved for priorities with a target_latency. On a machine
    /// whose cores are all busy this keeps their waits for a core short;
    /// other engine workers, model loading and other processes get the
    /// rest. Refused by the OS: logged, normal policy (docs/scheduling.md).
    /// [default: none]
    #[arg(long, env = "TICKSERVE_REALTIME_PRIORITY", value_name = "1-99", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub realtime_priority: Option<u8>,

    /// The time slice the same threads ask of Linux's fair scheduler
    /// (EEVDF, Linux 6.12+; no privileges needed), from "100us" to
    /// "100ms": a short one lets them preempt engine workers and other
    /// processes as soon as a request wakes them, at no change to their
    /// share of the CPU. "0s": the kernel's default (0.7-3 ms by core
    /// count). Older kernels ignore it (docs/scheduling.md). [default: 100us]
    #[arg(long, env = "TICKSERVE_REQUEST_SLICE", value_name = "DURATION", value_parser = humantime_duration)]
    pub request_slice: Option<Duration>,

    /// Threads that decode HTTP bodies of background requests (classes
    /// without a target_latency) off the async runtime, so that parsing
    /// them never delays a real-time request. Chosen per connection: after
    /// a background request, the connection's next body of 16 KiB or more
    /// is decoded there.
    /// 0: every body on the runtime. [default: one per two cores, at least 1]
    #[arg(long, env = "TICKSERVE_BACKGROUND_DECODE_THREADS", value_name = "N")]
    pub background_decode_threads: Option<usize>,

    /// Niceness of those threads (-20 to 19, Linux; negative values need
    /// CAP_SYS_NICE). [default: 10]
    #[arg(
        long,
        env = "TICKSERVE_BACKGROUND_DECODE_NICE",
        value_name = "NICE",
        allow_hyphen_values = true
    )]
    pub background_decode_nice: Option<i32>,

    /// On SIGTERM/SIGINT, how long to let queued and running requests
    /// finish before exiting, e.g. "30s", "500ms". [default: 30s]
    #[arg(long, env = "TICKSERVE_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = humantime_duration)]
    pub drain_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, how long to keep serving normally after
    /// readiness turns NOT_SERVING, before the drain, so that load
    /// balancers stop routing here first (Kubernetes: instead of a preStop
    /// sleep), e.g. "5s". [default: 0s]
    #[arg(long, env = "TICKSERVE_SHUTDOWN_DELAY", value_name = "DURATION", value_parser = humantime_duration)]
    pub shutdown_delay: Option<Duration>,

    /// Largest accepted request body in bytes; larger bodies get 413.
    /// [default: 16777216]
    #[arg(long, env = "TICKSERVE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Log format. [default: text]
    #[arg(long, env = "TICKSERVE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatArg>,

    /// Log level or filter in RUST_LOG syntax ("info",
    /// "tickserve_scheduler=debug,info"). [default: info]
    #[arg(long, env = "TICKSERVE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Result cache on or off (in-process, plus Redis when --redis-url is
    /// set). Models can opt out in their config.toml ([cache] enabled =
    /// false), requests with the parameter "cache": false. See
    /// docs/cache.md. [default: true]
    #[arg(long, env = "TICKSERVE_CACHE", value_name = "BOOL")]
    pub cache: Option<bool>,

    /// Most rows held in the in-process cache (TinyLFU/LRU eviction).
    /// With --cache-max-bytes as well, both limits hold. [default: 10000,
    /// or no row limit when only --cache-max-bytes is given]
    #[arg(long, env = "TICKSERVE_CACHE_CAPACITY", value_name = "ROWS")]
    pub cache_capacity: Option<u64>,

    /// Most bytes the in-process cache holds: each row's values plus its
    /// bookkeeping (about 180 bytes per row of the bundled model). With
    /// --cache-capacity as well, whichever limit is reached first evicts.
    /// [default: unset (rows only)]
    #[arg(long, env = "TICKSERVE_CACHE_MAX_BYTES", value_name = "BYTES")]
    pub cache_max_bytes: Option<u64>,

    /// Lifetime of a cached row, in memory and Redis, for models whose
    /// config.toml sets no [cache] ttl, e.g. "10m", "30s". [default: 10m]
    #[arg(long, env = "TICKSERVE_CACHE_TTL", value_name = "DURATION", value_parser = humantime_duration)]
    pub cache_ttl: Option<Duration>,

    /// Redis second-level cache, e.g. "redis://127.0.0.1:6379",
    /// "redis://:password@host:6379", or TLS "rediss://:password@host:6380"
    /// (the system's CA roots unless --redis-ca-cert). Unset: memory only.
    /// [default: unset]
    #[arg(
        long,
        env = "TICKSERVE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// PEM file of the CA (or CAs) that signed the Redis server's TLS
    /// certificate, trusted instead of the system's roots; needs a
    /// rediss:// URL. [default: unset (system roots)]
    #[arg(long, env = "TICKSERVE_REDIS_CA_CERT", value_name = "FILE")]
    pub redis_ca_cert: Option<PathBuf>,

    /// PEM client certificate (chain) for Redis servers that require one
    /// (tls-auth-clients yes); needs --redis-client-key. [default: unset]
    #[arg(long, env = "TICKSERVE_REDIS_CLIENT_CERT", value_name = "FILE")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of --redis-client-cert. [default: unset]
    #[arg(long, env = "TICKSERVE_REDIS_CLIENT_KEY", value_name = "FILE")]
    pub redis_client_key: Option<PathBuf>,

    /// Redis database number (replaces one given in the URL). [default: 1]
    #[arg(long, env = "TICKSERVE_REDIS_DB", value_name = "N")]
    pub redis_db: Option<i64>,

    /// Prefix of every Redis key: <prefix><model>:<32 hex digits>.
    /// [default: tickserve:]
    #[arg(long, env = "TICKSERVE_REDIS_KEY_PREFIX", value_name = "PREFIX")]
    pub redis_key_prefix: Option<String>,

    /// Lifetime of rows in Redis, when it should differ from the cache
    /// TTL. [default: the model's cache TTL]
    #[arg(long, env = "TICKSERVE_REDIS_TTL", value_name = "DURATION", value_parser = humantime_duration)]
    pub redis_ttl: Option<Duration>,

    /// Longest one Redis read or write may take; slower counts as a
    /// failure and the request goes on without Redis. [default: 5ms]
    #[arg(long, env = "TICKSERVE_REDIS_TIMEOUT", value_name = "DURATION", value_parser = humantime_duration)]
    pub redis_timeout: Option<Duration>,

    /// Bearer token of the admin endpoints (GET /v2/cache/stats,
    /// DELETE /v2/cache/models/{model}); unset turns them off.
    /// [default: unset]
    #[arg(
        long,
        env = "TICKSERVE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Which models are loaded and who may change that: none (every model
    /// at start), poll (and reload changed ones every poll interval) or
    /// explicit (only --load-model at start; the load/unload endpoints).
    /// [default: none]
    #[arg(long, env = "TICKSERVE_MODEL_CONTROL_MODE", value_name = "MODE")]
    pub model_control_mode: Option<ModelControlArg>,

    /// Explicit mode: a model to load at start; repeat it, or `*` for
    /// every model (environment: comma-separated). [default: none]
    #[arg(
        long = "load-model",
        env = "TICKSERVE_LOAD_MODEL",
        value_name = "MODEL",
        value_delimiter = ','
    )]
    pub load_model: Vec<String>,

    /// Poll mode: how often the repository is re-read. [default: 5s]
    #[arg(long, env = "TICKSERVE_REPOSITORY_POLL_INTERVAL", value_name = "DURATION", value_parser = humantime_duration)]
    pub repository_poll_interval: Option<Duration>,
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,
    #[command(flatten)]
    pub traces: crate::traces::TraceArgs,
}

/// The TOML file's contents: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model_repository: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    realtime_http_addr: Option<SocketAddr>,
    realtime_grpc_addr: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_delay: Option<Duration>,
    max_body_bytes: Option<usize>,
    log_format: Option<LogFormatArg>,
    log_level: Option<String>,
    cache: Option<bool>,
    cache_capacity: Option<u64>,
    cache_max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    cache_ttl: Option<Duration>,
    redis_url: Option<String>,
    redis_ca_cert: Option<PathBuf>,
    redis_client_cert: Option<PathBuf>,
    redis_client_key: Option<PathBuf>,
    redis_db: Option<i64>,
    redis_key_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    redis_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    redis_timeout: Option<Duration>,
    admin_token: Option<String>,
    model_control_mode: Option<ModelControlArg>,
    load_model: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    repository_poll_interval: Option<Duration>,
    auth_token: Option<String>,
    auth_token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_read_timeout: Option<Duration>,
    max_connections: Option<usize>,
    grpc_max_message_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    listen_backlog: Option<u32>,
    otlp_endpoint: Option<String>,
    otlp_service_name: Option<String>,
    otlp_sample_ratio: Option<f64>,
    realtime_priority: Option<u8>,
    #[serde(default, with = "humantime_serde")]
    request_slice: Option<Duration>,
    background_decode_threads: Option<usize>,
    background_decode_nice: Option<i32>,
}

/// The merged settings.
#[derive(Debug)]
pub struct Settings {
    pub server: ServerConfig,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The OTLP trace export; `None`: off.
    pub otlp: Option<OtlpConfig>,
    /// SCHED_FIFO priority of the real-time request path; `None`: off.
    pub realtime_priority: Option<u8>,
    /// The request path's fair-scheduler slice; zero: the kernel's.
    pub request_slice: Duration,
}

pub(crate) fn humantime_duration(text: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// The TLS files of the Redis tier, read now (before the runtime starts).
fn redis_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<RedisTls> {
    let client = read_cert_and_key(
        "Redis client",
        ["redis_client_cert", "redis_client_key"],
        cert,
        key,
    )?
    .map(|(cert_pem, key_pem)| ClientIdentity { cert_pem, key_pem });
    Ok(RedisTls {
        ca_pem: ca
            .map(|ca| read_pem("Redis CA certificate", &ca))
            .transpose()?,
        client,
    })
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl ServeArgs {
    pub fn resolve(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let parse_addr = |text: &str| -> anyhow::Result<SocketAddr> {
            text.parse()
                .with_context(|| format!("invalid address {text}"))
        };
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormatArg::Text);
        let max_body_bytes = self
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        anyhow::ensure!(max_body_bytes > 0, "max_body_bytes must be positive");
        let defaults = CacheConfig::default();
        let cache_ttl = self.cache_ttl.or(file.cache_ttl).unwrap_or(defaults.ttl);
        anyhow::ensure!(!cache_ttl.is_zero(), "cache_ttl must be positive");
        let max_bytes = self.cache_max_bytes.or(file.cache_max_bytes);
        anyhow::ensure!(max_bytes != Some(0), "cache_max_bytes must be positive");
        // Only a byte limit given: no row limit besides it.
        let capacity = match self.cache_capacity.or(file.cache_capacity) {
            Some(rows) => Some(rows),
            None if max_bytes.is_some() => None,
            None => defaults.capacity,
        };
        anyhow::ensure!(capacity != Some(0), "cache_capacity must be positive");
        let redis = match self.redis_url.or(file.redis_url) {
            None => None,
            Some(url) => {
                let d = RedisConfig::default();
                let timeout = self
                    .redis_timeout
                    .or(file.redis_timeout)
                    .unwrap_or(d.timeout);
                anyhow::ensure!(!timeout.is_zero(), "redis_timeout must be positive");
                let tls = redis_tls(
                    self.redis_ca_cert.or(file.redis_ca_cert),
                    self.redis_client_cert.or(file.redis_client_cert),
                    self.redis_client_key.or(file.redis_client_key),
                )?;
                anyhow::ensure!(
                    tls.is_empty() || url.starts_with("rediss://"),
                    "redis_ca_cert and redis_client_cert need a rediss:// URL"
                );
                Some(RedisConfig {
                    url,
                    tls,
                    db: self.redis_db.or(file.redis_db).unwrap_or(d.db),
                    key_prefix: self
                        .redis_key_prefix
                        .or(file.redis_key_prefix)
                        .unwrap_or(d.key_prefix),
                    ttl: self.redis_ttl.or(file.redis_ttl),
                    timeout,
                    ..d
                })
            }
        };
        let cache = CacheConfig {
            enabled: self.cache.or(file.cache).unwrap_or(defaults.enabled),
            capacity,
            max_bytes,
            ttl: cache_ttl,
            redis,
        };
        let admin_token = self
            .admin_token
            .or(file.admin_token)
            .filter(|t| !t.is_empty())
            .map(AdminToken::new);
        let control_defaults = ModelControl::default();
        let poll_interval = self
            .repository_poll_interval
            .or(file.repository_poll_interval)
            .unwrap_or(control_defaults.poll_interval);
        anyhow::ensure!(
            !poll_interval.is_zero(),
            "repository_poll_interval must be positive"
        );
        let load_models = if self.load_model.is_empty() {
            file.load_model.unwrap_or_default()
        } else {
            self.load_model
        };
        let mode = match self.model_control_mode.or(file.model_control_mode) {
            None | Some(ModelControlArg::None) => ControlMode::None,
            Some(ModelControlArg::Poll) => ControlMode::Poll,
            Some(ModelControlArg::Explicit) => ControlMode::Explicit,
        };
        anyhow::ensure!(
            load_models.is_empty() || mode == ControlMode::Explicit,
            "load_model applies to --model-control-mode explicit only (the other modes load every model)"
        );
        let model_control = ModelControl {
            mode,
            load_models,
            poll_interval,
        };
        let security = self.security.resolve(
            crate::security::SecurityFile {
                auth_token: file.auth_token,
                auth_token_file: file.auth_token_file,
                tls_cert: file.tls_cert,
                tls_key: file.tls_key,
                tls_client_ca: file.tls_client_ca,
                header_read_timeout: file.header_read_timeout,
                body_read_timeout: file.body_read_timeout,
                max_connections: file.max_connections,
                grpc_max_message_bytes: file.grpc_max_message_bytes,
                max_concurrent_streams: file.max_concurrent_streams,
                listen_backlog: file.listen_backlog,
            },
            max_body_bytes,
        )?;
        let realtime_priority = self.realtime_priority.or(file.realtime_priority);
        anyhow::ensure!(
            realtime_priority.is_none_or(|p| (1..=99).contains(&p)),
            "realtime_priority must be 1 to 99"
        );
        let request_slice = self
            .request_slice
            .or(file.request_slice)
            .unwrap_or(DEFAULT_REQUEST_SLICE);
        anyhow::ensure!(
            request_slice.is_zero() || os_thread::SLICE_RANGE.contains(&request_slice),
            "request_slice must be 0s (the kernel's default) or from 100us to 100ms, got {request_slice:?}"
        );
        let default_decode = DecodeConfig::default();
        let decode = DecodeConfig {
            threads: self
                .background_decode_threads
                .or(file.background_decode_threads)
                .unwrap_or(default_decode.threads),
            nice: self
                .background_decode_nice
                .or(file.background_decode_nice)
                .unwrap_or(default_decode.nice),
        };
        anyhow::ensure!(
            (-20..=19).contains(&decode.nice),
            "background_decode_nice must be -20 to 19, got {}",
            decode.nice
        );
        let otlp = self.traces.resolve(crate::traces::TraceFile {
            otlp_endpoint: file.otlp_endpoint,
            otlp_service_name: file.otlp_service_name,
            otlp_sample_ratio: file.otlp_sample_ratio,
        })?;
        Ok(Settings {
            server: ServerConfig {
                model_repository: self
                    .model_repository
                    .or(file.model_repository)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_REPOSITORY)),
                http_addr: match self.http_addr.or(file.http_addr) {
                    Some(addr) => addr,
                    None => parse_addr(DEFAULT_HTTP_ADDR)?,
                },
                grpc_addr: match self.grpc_addr.or(file.grpc_addr) {
                    Some(addr) => addr,
                    None => parse_addr(DEFAULT_GRPC_ADDR)?,
                },
                metrics_addr: match self.metrics_addr.or(file.metrics_addr) {
                    Some(addr) => addr,
                    None => parse_addr(DEFAULT_METRICS_ADDR)?,
                },
                realtime_http_addr: self.realtime_http_addr.or(file.realtime_http_addr),
                realtime_grpc_addr: self.realtime_grpc_addr.or(file.realtime_grpc_addr),
                drain_timeout: self
                    .drain_timeout
                    .or(file.drain_timeout)
                    .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
                shutdown_delay: self
                    .shutdown_delay
                    .or(file.shutdown_delay)
                    .unwrap_or_default(),
                max_body_bytes,
                cache,
                admin_token,
                model_control,
                auth: security.auth,
                tls: security.tls,
                limits: security.limits,
                decode,
            },
            log_format: match log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
            otlp,
            realtime_priority,
            request_slice,
        })
    }
}

#[cfg(test)]
mod tests;
