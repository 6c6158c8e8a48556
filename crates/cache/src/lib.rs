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
//!   access) bounded in entries, in bytes, or both (see [`L1Budget`]). Its
//!   expiry decision is made on tokio's clock (each entry carries its
//!   deadline), with moka's own per-entry expiry as the memory backstop.
//! * L2 is optional and never on the failure path: see [`l2`].
//! * The per-row orchestration (which rows go to the engine) lives in the
//!   server, which owns the scheduler; it uses [`flight::SingleFlight`] to
//!   coalesce identical misses.

pub mod breaker;
pub mod codec;
pub mod flight;
pub mod key;
pub mod l2;
mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::counter;
use moka::Expiry;
use moka::future::Cache;
use serde::Serialize;
use tickserve_telemetry as telemetry;
use tokio::time::Instant;

use crate::sync::lock;

pub use crate::codec::RowOutputs;
pub use crate::key::{CacheKey, KeyInput, row_key};
pub use crate::l2::{ClientIdentity, L2, L2Error, RedisConfig, RedisTls};

/// Server-wide cache settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// The in-process cache; off turns the whole cache off.
    pub enabled: bool,
    /// Most rows held in memory; `None` for no entry limit (then
    /// `max_bytes` bounds it).
    pub capacity: Option<u64>,
    /// Most bytes held in memory ([`entry_bytes`] per row); `None` for no
    /// byte limit. With both limits set, both hold.
    pub max_bytes: Option<u64>,
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
            capacity: Some(DEFAULT_CAPACITY),
            max_bytes: None,
            ttl: DEFAULT_TTL,
            redis: None,
        }
    }
}

/// A cached row as the server uses it.
pub type Row = Arc<RowOutputs>;

/// What one L1 entry costs in memory, as the byte budget and the stats
/// count it: the values, their vectors, the key, the entry and the model
/// name it carries. moka's own per-entry bookkeeping (its deques, timer
/// wheel and frequency sketch) is not included.
pub fn entry_bytes(model: &str, row: &RowOutputs) -> u64 {
    let values: usize = row.iter().map(Vec::len).sum();
    (std::mem::size_of::<CacheKey>()
        + std::mem::size_of::<Entry>()
        // Arc<RowOutputs>: two counters and the outer Vec.
        + 2 * std::mem::size_of::<usize>()
        + std::mem::size_of::<RowOutputs>()
        + row.len() * std::mem::size_of::<Vec<f32>>()
        + values * std::mem::size_of::<f32>()
        // Arc<str>: two counters and the text.
        + 2 * std::mem::size_of::<usize>()
        + model.len()) as u64
}

/// How the L1 limits map onto moka, which takes one capacity and one
/// weigher.
///
/// * entries only: capacity = entries, every entry weighs 1;
/// * bytes only: capacity = bytes, an entry weighs its [`entry_bytes`];
/// * both: capacity = bytes, an entry weighs at least `bytes / entries`
///   (its "slot"), so the weights summing to at most `bytes` bound the
///   count by `entries` and the memory by `bytes`: whichever limit is
///   reached first evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Budget {
    /// moka's `max_capacity`, in weight units.
    pub capacity: u64,
    /// Least weight of one entry (1 = no slot).
    pub min_weight: u32,
    /// Whether weights are bytes (else every entry weighs 1).
    pub by_bytes: bool,
}

impl L1Budget {
    pub fn of(config: &CacheConfig) -> Self {
        match (config.capacity, config.max_bytes) {
            (entries, None) => L1Budget {
                capacity: entries.unwrap_or(DEFAULT_CAPACITY),
                min_weight: 1,
                by_bytes: false,
            },
            (None, Some(bytes)) => L1Budget {
                capacity: bytes,
                min_weight: 1,
                by_bytes: true,
            },
            (Some(entries), Some(bytes)) => L1Budget {
                capacity: bytes,
                min_weight: (bytes / entries.max(1)).clamp(1, u64::from(u32::MAX)) as u32,
                by_bytes: true,
            },
        }
    }

    fn weigh(&self, entry: &Entry) -> u32 {
        if !self.by_bytes {
            return 1;
        }
        (entry.bytes.min(u64::from(u32::MAX)) as u32).max(self.min_weight)
    }
}

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
    /// Rows held now (moka's count, applied by [`ResultCache::sync`]).
    pub entries: u64,
    /// Their [`entry_bytes`] in total.
    pub bytes: u64,
    /// Entry limit; `None` when only `max_bytes` bounds the cache.
    pub capacity: Option<u64>,
    /// Byte limit; `None` when only `capacity` bounds the cache.
    pub max_bytes: Option<u64>,
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
    /// The latest Redis failure (`"connect: …"`, `"get: …"`), kept after
    /// Redis recovers; `None` when none happened.
    pub last_error: Option<String>,
}

impl ResultCache {
    /// Builds the cache; with Redis configured, starts its writer task on
    /// the current tokio runtime.
    pub fn new(config: CacheConfig) -> Result<Self, L2Error> {
        let counters = Counters::default();
        let bytes = Arc::clone(&counters.bytes);
        let budget = L1Budget::of(&config);
        let l1 = Cache::builder()
            .max_capacity(budget.capacity)
            .weigher(move |_key, entry: &Entry| budget.weigh(entry))
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
        let Some(hits) = l2.get_many(model, keys).await else {
            return vec![None; keys.len()];
        };
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
        let bytes = entry_bytes(model, &row);
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
                    last_error: lock(&k.last_error).clone(),
                }
            }
            None => L2Stats {
                enabled: false,
                state: "disabled",
                hits: 0,
                misses: 0,
                errors: 0,
                writes_dropped: 0,
                last_error: None,
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
                capacity: match (self.inner.config.capacity, self.inner.config.max_bytes) {
                    (None, None) => Some(DEFAULT_CAPACITY),
                    (entries, _) => entries,
                },
                max_bytes: self.inner.config.max_bytes,
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
        assert_eq!(cache.stats().l1.bytes, entry_bytes("b", &row(2.0)));
    }

    #[tokio::test]
    async fn capacity_bounds_the_entries() {
        let cache = ResultCache::new(CacheConfig {
            capacity: Some(100),
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

    /// A row of `values` floats in one output.
    fn wide_row(values: usize, v: f32) -> Row {
        Arc::new(vec![vec![v; values]])
    }

    /// A cache of at most `capacity` entries and `max_bytes` bytes.
    fn limited(capacity: Option<u64>, max_bytes: Option<u64>) -> ResultCache {
        ResultCache::new(CacheConfig {
            capacity,
            max_bytes,
            ..CacheConfig::default()
        })
        .unwrap()
    }

    /// Puts a row of `values` floats (each the key's number) under each of
    /// `keys` for a minute, applying each put before the next.
    async fn put_rows(cache: &ResultCache, keys: std::ops::Range<u128>, values: usize) {
        for i in keys {
            let ttl = Duration::from_secs(60);
            cache
                .put("m", CacheKey(i), wide_row(values, i as f32), ttl)
                .await;
            cache.sync().await;
        }
    }

    #[tokio::test]
    async fn the_byte_budget_evicts_and_the_stats_agree() {
        let per_row = entry_bytes("m", &wide_row(256, 0.0));
        assert!(per_row > 1024, "256 floats and bookkeeping: {per_row}");
        let budget = 10 * per_row;
        let cache = limited(None, Some(budget));
        put_rows(&cache, 0..10, 256).await;
        let l1 = cache.stats().l1;
        assert_eq!(
            (l1.entries, l1.bytes),
            (10, budget),
            "exactly at the budget: {l1:?}"
        );
        assert_eq!((l1.capacity, l1.max_bytes), (None, Some(budget)));

        put_rows(&cache, 10..40, 256).await;
        let l1 = cache.stats().l1;
        assert!(l1.bytes <= budget, "over the byte budget: {l1:?}");
        assert!(l1.entries <= 10, "{l1:?}");
        assert_eq!(
            l1.bytes,
            l1.entries * per_row,
            "bytes follow evictions: {l1:?}"
        );
        let held = (0..40u128)
            .filter(|&i| cache.inner.l1.contains_key(&CacheKey(i)))
            .count();
        assert_eq!(held as u64, l1.entries);
    }

    #[tokio::test]
    async fn with_both_limits_the_tighter_one_evicts() {
        let small = entry_bytes("m", &wide_row(3, 0.0));
        let big = entry_bytes("m", &wide_row(1024, 0.0));
        // Room for 8 small rows by count; by bytes, for 2 big ones.
        let cache = limited(Some(8), Some(2 * big));
        assert!(small * 8 < 2 * big);
        put_rows(&cache, 0..50, 3).await;
        assert!(
            cache.stats().l1.entries <= 8,
            "the entry limit holds: {:?}",
            cache.stats().l1
        );
        put_rows(&cache, 100..110, 1024).await;
        let l1 = cache.stats().l1;
        assert!(l1.bytes <= 2 * big, "the byte limit holds: {l1:?}");
        assert_eq!((l1.capacity, l1.max_bytes), (Some(8), Some(2 * big)));
    }
}
