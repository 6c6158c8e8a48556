//! Telemetry in one place: every Prometheus metric name, label and bucket
//! set tickserve exports, the recorder that renders them, logging, and the
//! OTLP export of request traces ([`traces`]).
//!
//! Names follow the platform's design document (seed-requirements.md,
//! Metrics) where a metric there fits — `batch_processing_*` with its
//! labels and buckets — and use the `tickserve_` prefix for figures the
//! design does not have. Every other crate records through the `metrics`
//! macros with the constants below, so a name is never spelled twice.

pub mod cgroup;
pub mod sla;
pub mod throughput;
pub mod traces;

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter of finished requests. Labels: `model`, `version`, `outcome`
/// (`success` or an [`error_type`] value), `batch_type` (`single` for a
/// one-row request, `multi` otherwise), `source` (`http` or `grpc`),
/// `priority` (1–5).
pub const REQUESTS_TOTAL: &str = "batch_processing_requests_total";
/// Histogram of request latency from arrival to answer, seconds. Labels:
/// `model`, `version`, `batch_size_range` (see [`batch_size_range`]),
/// `priority`.
pub const REQUEST_LATENCY: &str = "batch_processing_latency_seconds";
/// Histogram of rows per engine call. Labels: `model`, `version`.
pub const BATCH_SIZE: &str = "batch_processing_batch_size";
/// Histogram of the time a request waited in the queue before its batch
/// left for the engine, seconds. Labels: `model`, `version`, `priority`
/// (1–5).
pub const QUEUE_WAIT: &str = "batch_processing_wait_time_seconds";
/// Gauge of requests waiting in the queue. Labels: `model`, `version`,
/// `priority`: two loaded versions keep separate gauges.
pub const QUEUE_LENGTH: &str = "batch_processing_queue_length";
/// Counter of failed requests. Labels: `model` (`unknown` when the model
/// or version does not exist), `version` (absent then), `error_type`,
/// `priority` (`none` when the
/// request failed before its class was known).
pub const ERRORS_TOTAL: &str = "batch_processing_errors_total";
/// Histogram of engine execution time per batch, seconds. Labels: `model`,
/// `version`.
pub const ENGINE_EXECUTION: &str = "tickserve_engine_execution_seconds";
/// Counter of batches run by the engine. Labels: `model`, `version`.
pub const BATCHES_TOTAL: &str = "tickserve_batches_total";
/// Counter of requests dropped before the engine because their client had
/// gone. Labels: `model`, `version`.
pub const DROPPED_TOTAL: &str = "tickserve_requests_dropped_total";
/// Counter of requests refused or expired by the scheduler. Labels:
/// `model`, `version`, `priority`, `reason` (a [`rejection`] value).
pub const REJECTIONS_TOTAL: &str = "tickserve_rejections_total";
/// Gauge of the live max batch size the adaptive controller set. Labels:
/// `model`, `version`.
pub const ADAPTIVE_BATCH_SIZE: &str = "batch_processing_adaptive_batch_size";
/// Gauge of the rows per engine call of batches that run in preemptible
/// chunks (docs/scheduling.md). Labels: `model`, `version`.
pub const CHUNK_ROWS: &str = "tickserve_chunk_rows";
/// Gauge of how many times longer than predicted admitted requests of a
/// class have lately waited; admission scales its predictions by it
/// (docs/scheduling.md). Labels: `model`, `version`, `priority`.
pub const ADMISSION_WAIT_SCALE: &str = "tickserve_admission_wait_scale";
/// Counter of engine calls retried on halves of a failed batch. Labels:
/// `model`, `version`.
pub const ENGINE_RETRIES_TOTAL: &str = "tickserve_engine_retries_total";
/// Counter of HTTP request bodies decoded on the background decode threads
/// instead of the async runtime (docs/scheduling.md). No labels.
pub const BACKGROUND_DECODES_TOTAL: &str = "tickserve_background_decodes_total";
/// Gauge of a GPU's utilisation, percent (resource monitor, NVML). Label:
/// `gpu_id`.
pub const GPU_UTILISATION: &str = "batch_processing_gpu_utilization_percent";
/// Gauges of a GPU's memory in use and in total, bytes. Label: `gpu_id`.
pub const GPU_MEMORY_USED: &str = "tickserve_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "tickserve_gpu_memory_total_bytes";
/// Gauge of CPU utilisation, percent (resource monitor): of the cgroup's
/// quota where one is set (see [`cgroup`]), else of the machine.
pub const CPU_UTILISATION: &str = "batch_processing_cpu_utilization_percent";
/// Gauge of memory utilisation, percent (resource monitor): of the
/// cgroup's limit where one is set, else of the machine.
pub const MEMORY_UTILISATION: &str = "batch_processing_memory_utilization_percent";
/// Gauge of completed requests per second over the last
/// [`throughput::WINDOW_SECONDS`] seconds. Label: `model`.
pub const THROUGHPUT: &str = "batch_processing_throughput_rps";
/// Gauge, 1 when every model is loaded and warmed up.
pub const READY: &str = "tickserve_ready";
/// Connections closed or answered 503 because the address was at its
/// connection cap, by `listener` (http, grpc).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "tickserve_connections_refused_total";
/// Counter of rows answered from the result cache. Labels: `model`,
/// `tier` (`l1` in-process, `l2` Redis).
pub const CACHE_HITS: &str = "batch_processing_cache_hits_total";
/// Counter of rows the result cache did not hold. Labels: `model`, `tier`.
pub const CACHE_MISSES: &str = "batch_processing_cache_misses_total";
/// Counter of rows that waited for an identical row already in flight
/// instead of running the engine. Label: `model`.
pub const CACHE_COALESCED: &str = "tickserve_cache_coalesced_total";
/// Counter of failed or timed-out Redis operations. Label: `operation`.
pub const CACHE_REDIS_ERRORS: &str = "tickserve_cache_redis_errors_total";
/// Counter of Redis writes dropped because the write-behind queue was
/// full or Redis was unavailable.
pub const CACHE_REDIS_WRITES_DROPPED: &str = "tickserve_cache_redis_writes_dropped_total";
/// Gauge of the Redis circuit breaker: 0 closed, 1 open, 2 half-open.
pub const CACHE_REDIS_CIRCUIT: &str = "tickserve_cache_redis_circuit_state";
/// Histogram of one request's cache lookup time, seconds. Label: `tier`.
pub const CACHE_LOOKUP: &str = "tickserve_cache_lookup_seconds";
/// Gauge: live streams (per-instrument windows) of a model version
/// (docs/streams.md).
pub const STREAMS_LIVE: &str = "tickserve_streams_live";
/// Gauge: bytes the live streams' windows and ids hold.
pub const STREAMS_MEMORY: &str = "tickserve_streams_memory_bytes";
/// Counter: streams dropped by the server, by `reason` ("idle" or
/// "capacity"), not counting those a client ended.
pub const STREAMS_EVICTED: &str = "tickserve_streams_evicted_total";

/// Latency buckets of the design document, seconds, with sub-millisecond
/// steps added below them: tickserve answers in hundreds of microseconds.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];
/// Batch-size buckets of the design document, rows.
pub const BATCH_SIZE_BUCKETS: [f64; 9] = [1.0, 5.0, 10.0, 20.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Queue-wait buckets of the design document, with sub-millisecond steps
/// added: tickserve's waits are measured in hundreds of microseconds.
pub const WAIT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Engine time buckets, seconds: a batch runs in 0.1–20 ms.
pub const ENGINE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Cache lookup buckets, seconds: an L1 lookup takes microseconds, a
/// Redis round trip on loopback a few hundred.
pub const CACHE_LOOKUP_BUCKETS: [f64; 10] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
];

/// The `batch_size_range` label of the design document for a request of
/// `rows` rows.
pub fn batch_size_range(rows: usize) -> &'static str {
    match rows {
        0..=1 => "single",
        2..=10 => "small",
        11..=50 => "medium",
        51..=100 => "large",
        _ => "xlarge",
    }
}

/// Values of the `reason` label of [`REJECTIONS_TOTAL`].
pub mod rejection {
    /// The request's class queue was full.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Admission control: the deadline could not be met.
    pub const DEADLINE: &str = "deadline";
    /// The request's timeout expired while it waited.
    pub const TIMEOUT_EXPIRED: &str = "timeout_expired";
    /// A lower class refused while a higher class is being refused.
    pub const SHED: &str = "shed";
}

/// Values of the `error_type` / `outcome` labels.
pub mod error_type {
    pub const INVALID: &str = "invalid_request";
    pub const NOT_FOUND: &str = "not_found";
    pub const QUEUE_FULL: &str = "queue_full";
    /// Refused at admission: the deadline could not be met.
    pub const DEADLINE: &str = "deadline";
    /// Refused while a higher priority is being refused (load shedding).
    pub const SHED: &str = "shed";
    /// The request's timeout expired in the queue.
    pub const TIMEOUT: &str = "timeout";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const ENGINE: &str = "engine";
    pub const CANCELLED: &str = "cancelled";
    /// A stream's window is not full yet under `warmup = "reject"`.
    pub const STREAM_WARMUP: &str = "stream_warmup";
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle, so tests that start several servers share it) and
/// describes every metric.
pub fn install_recorder() -> Result<PrometheusHandle, TelemetryError> {
    // Serialises installs: without it, a second caller racing the first
    // could find the recorder set but the handle not yet stored.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // Servers started in parallel (tests) must not race between installing
    // the recorder and publishing its handle: the loser would find neither.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_LATENCY.into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &BATCH_SIZE_BUCKETS)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), &WAIT_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(ENGINE_EXECUTION.into()), &ENGINE_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(CACHE_LOOKUP.into()), &CACHE_LOOKUP_BUCKETS)
        })
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    // A second install in the same process (a race between tests) loses
    // here; the winner's handle is the one everybody renders.
    if metrics::set_global_recorder(recorder).is_ok() {
        describe();
        let _ = HANDLE.set(handle);
    }
    HANDLE
        .get()
        .cloned()
        .ok_or_else(|| TelemetryError::Recorder("another metrics recorder is installed".into()))
}

fn describe() {
    describe_counter!(REQUESTS_TOTAL, "Inference requests answered, by outcome");
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections refused at the connection cap, by listener"
    );
    describe_histogram!(
        REQUEST_LATENCY,
        Unit::Seconds,
        "Request latency from arrival to answer"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Rows per engine call");
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time a request waited before its batch left for the engine"
    );
    describe_gauge!(
        QUEUE_LENGTH,
        Unit::Count,
        "Requests waiting in the batch queue"
    );
    describe_counter!(ERRORS_TOTAL, "Failed inference requests, by error type");
    describe_histogram!(
        ENGINE_EXECUTION,
        Unit::Seconds,
        "Engine execution time per batch"
    );
    describe_counter!(BATCHES_TOTAL, "Batches run by the engine");
    describe_counter!(
        DROPPED_TOTAL,
        "Requests dropped before the engine because the client disconnected"
    );
    describe_counter!(
        REJECTIONS_TOTAL,
        "Requests refused (queue full, deadline) or expired in the queue, by priority and reason"
    );
    describe_gauge!(
        GPU_UTILISATION,
        Unit::Percent,
        "GPU utilisation (NVML), by gpu_id"
    );
    describe_gauge!(
        GPU_MEMORY_USED,
        Unit::Bytes,
        "GPU memory in use (NVML), by gpu_id"
    );
    describe_gauge!(
        GPU_MEMORY_TOTAL,
        Unit::Bytes,
        "GPU memory in total (NVML), by gpu_id"
    );
    describe_gauge!(
        ADMISSION_WAIT_SCALE,
        Unit::Count,
        "How many times longer than predicted admitted requests lately waited"
    );
    describe_gauge!(
        CHUNK_ROWS,
        Unit::Count,
        "Rows per engine call of batches that run in preemptible chunks"
    );
    describe_counter!(
        BACKGROUND_DECODES_TOTAL,
        Unit::Count,
        "HTTP request bodies decoded on the background decode threads"
    );
    describe_counter!(
        ENGINE_RETRIES_TOTAL,
        Unit::Count,
        "Engine calls retried on halves of a failed batch"
    );
    describe_gauge!(
        ADAPTIVE_BATCH_SIZE,
        Unit::Count,
        "Live max batch size set by the adaptive controller"
    );
    describe_gauge!(CPU_UTILISATION, "Machine CPU utilisation, percent");
    describe_gauge!(MEMORY_UTILISATION, "Machine memory utilisation, percent");
    describe_gauge!(
        THROUGHPUT,
        "Completed requests per second over a sliding window"
    );
    describe_gauge!(READY, "1 when every model is loaded and warmed up");
    describe_counter!(CACHE_HITS, "Rows answered from the result cache, by tier");
    describe_counter!(CACHE_MISSES, "Rows not found in the result cache, by tier");
    describe_counter!(
        CACHE_COALESCED,
        "Rows that waited for an identical row in flight instead of running the engine"
    );
    describe_gauge!(
        STREAMS_LIVE,
        "Live streams (per-instrument windows) of a model version"
    );
    describe_gauge!(
        STREAMS_MEMORY,
        Unit::Bytes,
        "Bytes held by the live streams' windows and ids"
    );
    describe_counter!(
        STREAMS_EVICTED,
        "Streams dropped by the server (idle timeout or capacity), by reason"
    );
    describe_counter!(CACHE_REDIS_ERRORS, "Failed or timed-out Redis operations");
    describe_counter!(
        CACHE_REDIS_WRITES_DROPPED,
        "Redis writes dropped (write-behind queue full or Redis unavailable)"
    );
    describe_gauge!(
        CACHE_REDIS_CIRCUIT,
        "Redis circuit breaker: 0 closed, 1 open, 2 half-open"
    );
    describe_histogram!(
        CACHE_LOOKUP,
        Unit::Seconds,
        "Cache lookup time of one request, by tier"
    );
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global `tracing` subscriber. `filter` takes `RUST_LOG`
/// syntax (`info`, `tickserve_scheduler=debug,info`). The same as
/// [`traces::init_logging_and_traces`] with the trace export off.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    traces::init_logging_and_traces(format, filter, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_ranges_follow_the_design_document() {
        assert_eq!(batch_size_range(1), "single");
        assert_eq!(batch_size_range(10), "small");
        assert_eq!(batch_size_range(11), "medium");
        assert_eq!(batch_size_range(50), "medium");
        assert_eq!(batch_size_range(100), "large");
        assert_eq!(batch_size_range(101), "xlarge");
    }
}
