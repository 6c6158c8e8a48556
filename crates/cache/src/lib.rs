//! tickserve's result cache: identical rows are computed once.
//!
//! ```text
//!  request rows ─▶ keys (key.rs) ─▶ L1 (moka, in-process) ─miss─▶ L2 (Redis, l2.rs)
//!                                     ▲  promote with remaining TTL ◀─hit─┘
//!                                     └── store ◀── engine ◀─miss─ single-flight (flight.rs)
//! ```
//!
//! * [`ResultCache`] is the cloneable handle: L1 lookups and stores, the
//!   optional Redis tier, counters for the stats endpoint, clearing by
//!   model.
//! * L1 is a moka cache (TinyLFU admission, LRU eviction, O(1) per
//!   access) bounded in entries. Its expiry decision is made on tokio's
//!   clock (each entry carries its deadline), with moka's own per-entry
//!   expiry as the memory backstop.
//! * L2 is optional and never on the failure path: see [`l2`].
//! * The per-row orchestration (which rows go to the engine) lives in the
//!   server, which owns the scheduler; it uses [`flight::SingleFlight`] to
//!   coalesce identical misses.

pub mod breaker;
pub mod codec;
pub mod flight;
pub mod key;
pub mod l2;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::counter;
use moka::Expiry;
use moka::future::Cache;
use serde::Serialize;
use tickserve_telemetry as telemetry;
use tokio::time::Instant;

pub use crate::codec::RowOutputs;
pub use crate::key::{CacheKey, KeyInput, row_key};
pub use crate::l2::{L2, L2Error, RedisConfig};

/// Server-wide cache settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// The in-process cache; off turns the whole cache off.
    pub enabled: bool,
    /// Most rows held in memory.
    pub capacity: u64,
    /// Entry lifetime for models that set none.
    pub ttl: Duration,
    /// The Redis tier; `None` for memory only.
    pub redis: Option<RedisConfig>,
}

pub const DEFAULT_CAPACITY: u64 = 10_000;
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            capacity: DEFAULT_CAPACITY,
            ttl: DEFAULT_TTL,
            redis: None,
        }
    }
}

/// A cached row as the server uses it.
pub type Row = Arc<RowOutputs>;

#[derive(Debug, Clone)]
struct Entry {
    model: Arc<str>,
    row: Row,
    expires: Instant,
    ttl: Duration,
    bytes: u64,
}

struct EntryExpiry;

impl Expiry<CacheKey, Entry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[derive(Debug, Default)]
struct Counters {
    l1_hits: AtomicU64,
    l1_misses: AtomicU64,
    coalesced: AtomicU64,
    bytes: Arc<AtomicU64>,
}

/// Cloneable handle to the cache.
#[derive(Debug, Clone)]
pub struct ResultCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    l1: Cache<CacheKey, Entry>,
    l2: Option<L2>,
    config: CacheConfig,
    counters: Counters,
}

/// What `GET /v2/cache/stats` shows.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    pub l1: L1Stats,
    pub l2: L2Stats,
    /// Rows that waited for an identical row in flight.
    pub coalesced: u64,
    /// Rows answered by L1 or L2 over rows looked up.
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct L1Stats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
    pub capacity: u64,
    pub default_ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct L2Stats {
    pub enabled: bool,
    /// `disabled`, `closed` (in use), `open` (failing, not called) or
    /// `half_open` (being probed).
    pub state: &'static str,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub writes_dropped: u64,
}

impl ResultCache {
    /// Builds the cache; with Redis configured, starts its writer task on
    /// the current tokio runtime.
    pub fn new(config: CacheConfig) -> Result<Self, L2Error> {
        let counters = Counters::default();
        let bytes = Arc::clone(&counters.bytes);
        let l1 = Cache::builder()
            .max_capacity(config.capacity)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .eviction_listener(move |_key, entry: Entry, _cause| {
                bytes.fetch_sub(entry.bytes, Ordering::Relaxed);
            })
            .build();
        let l2 = config.redis.clone().map(L2::start).transpose()?;
        Ok(ResultCache {
            inner: Arc::new(Inner {
                l1,
                l2,
                config,
                counters,
            }),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    pub fn l2(&self) -> Option<&L2> {
        self.inner.l2.as_ref()
    }

    /// L1 lookup without touching the counters (the re-check a new
    /// single-flight leader makes).
    pub async fn peek(&self, key: &CacheKey) -> Option<Row> {
        let entry = self.inner.l1.get(key).await?;
        if entry.expires <= Instant::now() {
            self.inner.l1.invalidate(key).await;
            return None;
        }
        Some(entry.row)
    }

    /// L1 lookup of every key, counted as hits and misses of `model`.
    pub async fn get_l1(&self, model: &str, keys: &[CacheKey]) -> Vec<Option<Row>> {
        let started = std::time::Instant::now();
        let mut rows = Vec::with_capacity(keys.len());
        for key in keys {
            rows.push(self.peek(key).await);
        }
        let hits = rows.iter().filter(|r| r.is_some()).count() as u64;
        let misses = keys.len() as u64 - hits;
        let c = &self.inner.counters;
        c.l1_hits.fetch_add(hits, Ordering::Relaxed);
        c.l1_misses.fetch_add(misses, Ordering::Relaxed);
        counter!(telemetry::CACHE_HITS, "model" => model.to_owned(), "tier" => "l1")
            .increment(hits);
        counter!(telemetry::CACHE_MISSES, "model" => model.to_owned(), "tier" => "l1")
            .increment(misses);
        metrics::histogram!(telemetry::CACHE_LOOKUP, "tier" => "l1")
            .record(started.elapsed().as_secs_f64());
        rows
    }

    /// L2 lookup of every key; hits are promoted into L1 with the lifetime
    /// they have left in Redis (at most `ttl`). All `None` without Redis or
    /// when Redis does not answer.
    pub async fn get_l2(&self, model: &str, keys: &[CacheKey], ttl: Duration) -> Vec<Option<Row>> {
        let Some(l2) = &self.inner.l2 else {
            return vec![None; keys.len()];
        };
        let started = std::time::Instant::now();
        let Some(hits) = l2.get_many(model, keys).await else {
            return vec![None; keys.len()];
        };
        metrics::histogram!(telemetry::CACHE_LOOKUP, "tier" => "l2")
            .record(started.elapsed().as_secs_f64());
        let mut rows = Vec::with_capacity(keys.len());
        for (key, hit) in keys.iter().zip(hits) {
            match hit {
                Some(hit) => {
                    let row = Arc::new(hit.row);
                    let remaining = if hit.remaining.is_zero() {
                        ttl
                    } else {
                        hit.remaining.min(ttl)
                    };
                    self.insert_l1(model, *key, Arc::clone(&row), remaining)
                        .await;
                    rows.push(Some(row));
                }
                None => rows.push(None),
            }
        }
        rows
    }

    async fn insert_l1(&self, model: &str, key: CacheKey, row: Row, ttl: Duration) {
        let bytes = codec::encoded_len(&row) as u64;
        self.inner
            .counters
            .bytes
            .fetch_add(bytes, Ordering::Relaxed);
        let entry = Entry {
            model: Arc::from(model),
            row,
            expires: Instant::now() + ttl,
            ttl,
            bytes,
        };
        self.inner.l1.insert(key, entry).await;
    }

    /// Stores a freshly computed row in L1 now and in Redis behind the
    /// response (write-behind).
    pub async fn put(&self, model: &str, key: CacheKey, row: Row, ttl: Duration) {
        if let Some(l2) = &self.inner.l2 {
            l2.put(model, key, &row, ttl);
        }
        self.insert_l1(model, key, row, ttl).await;
    }

    /// Counts rows served by waiting for an identical row in flight.
    pub fn record_coalesced(&self, model: &str, rows: u64) {
        self.inner
            .counters
            .coalesced
            .fetch_add(rows, Ordering::Relaxed);
        counter!(telemetry::CACHE_COALESCED, "model" => model.to_owned()).increment(rows);
    }

    /// Removes every entry of `model` (all versions) from L1 and/or
    /// Redis. Returns the Redis keys deleted (`None` without Redis or when
    /// `l2` is false).
    pub async fn clear_model(
        &self,
        model: &str,
        l1: bool,
        l2: bool,
    ) -> Result<Option<u64>, L2Error> {
        if l1 {
            self.clear_l1(model).await;
        }
        match &self.inner.l2 {
            Some(tier) if l2 => tier.clear_model(model).await.map(Some),
            _ => Ok(None),
        }
    }

    async fn clear_l1(&self, model: &str) {
        let target: Arc<str> = Arc::from(model);
        // Only fails when invalidation closures are not enabled, which the
        // builder above always does.
        if let Err(error) = self
            .inner
            .l1
            .invalidate_entries_if(move |_k, entry| entry.model == target)
        {
            tracing::error!(%error, "cannot clear the in-process cache");
        }
        self.inner.l1.run_pending_tasks().await;
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (l1_hits, l1_misses) = (load(&c.l1_hits), load(&c.l1_misses));
        let l2 = match &self.inner.l2 {
            Some(l2) => {
                let k = l2.counters();
                L2Stats {
                    enabled: true,
                    state: l2.state().as_str(),
                    hits: load(&k.hits),
                    misses: load(&k.misses),
                    errors: load(&k.errors),
                    writes_dropped: load(&k.writes_dropped),
                }
            }
            None => L2Stats {
                enabled: false,
                state: "disabled",
                hits: 0,
                misses: 0,
                errors: 0,
                writes_dropped: 0,
            },
        };
        let looked_up = l1_hits + l1_misses;
        let hit_rate = if looked_up == 0 {
            0.0
        } else {
            (l1_hits + l2.hits) as f64 / looked_up as f64
        };
        CacheStats {
            l1: L1Stats {
                hits: l1_hits,
                misses: l1_misses,
                entries: self.inner.l1.entry_count(),
                bytes: load(&c.bytes),
                capacity: self.inner.config.capacity,
                default_ttl_ms: self.inner.config.ttl.as_millis() as u64,
            },
            l2,
            coalesced: load(&c.coalesced),
            hit_rate,
        }
    }

    /// Applies moka's pending bookkeeping (entry counts are eventually
    /// consistent); for tests and the stats endpoint.
    pub async fn sync(&self) {
        self.inner.l1.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f32) -> Row {
        Arc::new(vec![vec![v, v + 1.0, v + 2.0]])
    }

    #[tokio::test(start_paused = true)]
    async fn l1_entries_expire_on_the_tokio_clock() {
        let cache = ResultCache::new(CacheConfig::default()).unwrap();
        let k = CacheKey(42);
        cache.put("m", k, row(1.0), Duration::from_secs(10)).await;
        assert_eq!(cache.get_l1("m", &[k]).await[0], Some(row(1.0)));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(cache.peek(&k).await.is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(cache.get_l1("m", &[k]).await[0].is_none());
        let stats = cache.stats();
        assert_eq!((stats.l1.hits, stats.l1.misses), (1, 1));
    }

    #[tokio::test]
    async fn clearing_a_model_keeps_other_models() {
        let cache = ResultCache::new(CacheConfig::default()).unwrap();
        let ttl = Duration::from_secs(60);
        cache.put("a", CacheKey(1), row(1.0), ttl).await;
        cache.put("b", CacheKey(2), row(2.0), ttl).await;
        cache.sync().await;
        assert_eq!(cache.stats().l1.entries, 2);
        assert!(cache.stats().l1.bytes > 0);
        assert_eq!(cache.clear_model("a", true, true).await.unwrap(), None);
        assert!(cache.peek(&CacheKey(1)).await.is_none());
        assert!(cache.peek(&CacheKey(2)).await.is_some());
        cache.sync().await;
        assert_eq!(cache.stats().l1.entries, 1);
        assert_eq!(cache.stats().l1.bytes, codec::encoded_len(&row(2.0)) as u64);
    }

    #[tokio::test]
    async fn capacity_bounds_the_entries() {
        let cache = ResultCache::new(CacheConfig {
            capacity: 100,
            ..CacheConfig::default()
        })
        .unwrap();
        for i in 0..1000u128 {
            cache
                .put("m", CacheKey(i), row(i as f32), Duration::from_secs(60))
                .await;
        }
        cache.sync().await;
        assert!(cache.stats().l1.entries <= 100, "{:?}", cache.stats().l1);
    }
}
