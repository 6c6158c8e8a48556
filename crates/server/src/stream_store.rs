//! The bounded store of one model version's streams: each stream's window
//! of its last T rows, found by id, with a cap on live streams and on
//! memory, an idle timeout and least-recently-used eviction.
//!
//! ```text
//!  begin(id, start, end, rows)
//!   ─▶ table lock (short, no await): drop idle streams, find or create
//!      the stream, mark it most recently used, evict to make room
//!   ─▶ the stream's own lock (async, FIFO): one request of a stream at a
//!      time, in arrival order; at most max_pending wait
//!   ─▶ next window = last T rows of (old rows ++ new rows), the model's
//!      input (padded when the policy says so)         ── a Turn
//!  Turn::commit() after the model answered: the window becomes `next`;
//!  a Turn dropped without commit leaves the window as it was
//! ```
//!
//! The table lock is a `std::sync::Mutex` held for a few map operations,
//! never across an await; the stream's lock is a tokio mutex held from
//! `begin` until the answer, so the next request of the same stream sees
//! the window this one left. Eviction marks the stream dead: a request
//! already waiting for it gets the "unknown stream" error, never a window
//! built from rows the store has dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::{counter, gauge};
use tickserve_repository::{PadWith, StreamConfig, WarmupPolicy};
use tickserve_telemetry as telemetry;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// A stream's name: Triton's `sequence_id`, a number or a string (the
/// number 7 and the string "7" are different streams, as in Triton).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum StreamId {
    Number(u64),
    Text(String),
}

impl StreamId {
    /// Bytes the id adds to its stream's footprint.
    fn bytes(&self) -> usize {
        match self {
            StreamId::Number(_) => 0,
            StreamId::Text(text) => text.len(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamId::Number(n) => write!(f, "{n}"),
            StreamId::Text(text) => write!(f, "{text:?}"),
        }
    }
}

/// Why the store refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error(
        "stream {id} of model '{model}' is unknown: it was never started, it has ended, or it was evicted (idle for {idle:?}, or to make room); start it again with sequence_start=true"
    )]
    Unknown {
        model: String,
        id: String,
        idle: Duration,
    },
    #[error(
        "stream {id} holds {have} of the {window} rows model '{model}' needs; {missing} more rows are needed before it is answered (warmup = \"reject\"); the rows sent were kept"
    )]
    WarmingUp {
        model: String,
        id: String,
        have: usize,
        window: usize,
        missing: usize,
    },
    #[error(
        "stream {id} of model '{model}' already has {pending} requests in flight or waiting (stream.max_pending); requests of one stream are served one at a time"
    )]
    Busy {
        model: String,
        id: String,
        pending: usize,
    },
}

/// What fixes the shape of every window: T rows of F values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowShape {
    pub(crate) rows: usize,
    pub(crate) row_len: usize,
}

impl WindowShape {
    fn values(self) -> usize {
        self.rows * self.row_len
    }
}

/// One model version's streams; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct StreamStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    model: String,
    version: String,
    shape: WindowShape,
    config: StreamConfig,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    streams: HashMap<StreamId, Slot>,
    /// Use order: the smallest key is the least recently used stream.
    lru: BTreeMap<u64, StreamId>,
    next_use: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Slot {
    stream: Arc<Stream>,
    last_use: u64,
    last_used_at: Instant,
    bytes: u64,
}

#[derive(Debug)]
struct Stream {
    window: Arc<tokio::sync::Mutex<Window>>,
    /// False once evicted or ended: holders of the Arc must not use it.
    live: AtomicBool,
    /// Requests holding or waiting for the window.
    pending: AtomicUsize,
}

#[derive(Debug)]
struct Window {
    /// The last rows, oldest first; at most T rows, capacity T rows.
    data: Vec<f32>,
    /// False until a request that started the stream was answered.
    started: bool,
}

impl Window {
    /// Makes `rows` the window, in the buffer allocated when the stream
    /// started (T × F values, never more), so a stream holds what the
    /// memory cap counts whatever buffer the request's rows came in.
    fn replace(&mut self, rows: &[f32]) {
        self.data.clear();
        self.data.extend_from_slice(rows);
        self.started = true;
    }
}

/// Why a stream left the store.
#[derive(Debug, Clone, Copy)]
enum Removal {
    Idle,
    Capacity,
    /// Ended by its client, or a start that failed.
    Client,
}

impl StreamStore {
    pub(crate) fn new(model: &str, version: u64, shape: WindowShape, config: StreamConfig) -> Self {
        let store = StreamStore {
            inner: Arc::new(Inner {
                model: model.to_owned(),
                version: version.to_string(),
                shape,
                config,
                table: Mutex::new(Table::default()),
            }),
        };
        store.inner.publish(&store.inner.lock());
        store
    }

    /// The model's window: T rows of F values.
    pub(crate) fn shape(&self) -> WindowShape {
        self.inner.shape
    }

    /// Live streams and the bytes they hold.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (usize, u64) {
        let table = self.inner.lock();
        (table.streams.len(), table.bytes)
    }

    /// Drops the streams idle for longer than the idle timeout.
    pub(crate) fn sweep(&self) {
        let mut table = self.inner.lock();
        self.inner.sweep(&mut table, Instant::now());
        self.inner.publish(&table);
    }

    /// Takes the stream's turn and prepares the window with `rows` (k × F
    /// values, 1 ≤ k ≤ T, already validated) appended; `start` (re)starts
    /// the stream with these rows alone. Waits while another request of
    /// the same stream is in flight.
    pub(crate) async fn begin(
        &self,
        id: StreamId,
        start: bool,
        end: bool,
        rows: Vec<f32>,
    ) -> Result<Turn, StreamError> {
        let inner = &self.inner;
        let (stream, created) = {
            let mut table = inner.lock();
            let now = Instant::now();
            inner.sweep(&mut table, now);
            let found = table.streams.get(&id).map(|slot| Arc::clone(&slot.stream));
            let result = match found {
                Some(stream) => {
                    table.touch(&id, now);
                    Ok((stream, false))
                }
                None if start => Ok((inner.create(&mut table, id.clone(), now), true)),
                None => Err(inner.unknown(&id)),
            };
            inner.publish(&table);
            result?
        };
        let pending = Pending::enter(&stream);
        if pending.count > inner.config.max_pending {
            if created {
                inner.remove_if_same(&id, &stream, Removal::Client);
            }
            return Err(StreamError::Busy {
                model: inner.model.clone(),
                id: id.to_string(),
                pending: pending.count - 1,
            });
        }
        let mut window = stream.window.clone().lock_owned().await;
        if !stream.live.load(Ordering::Acquire) || !(start || window.started) {
            return Err(inner.unknown(&id));
        }
        let shape = inner.shape;
        let next = if start {
            rows
        } else {
            let kept = window.data.len() + rows.len();
            let skip = kept.saturating_sub(shape.values());
            let mut next = Vec::with_capacity(shape.values());
            next.extend_from_slice(&window.data[skip.min(window.data.len())..]);
            next.extend_from_slice(&rows[skip.saturating_sub(window.data.len())..]);
            next
        };
        let have = next.len() / shape.row_len;
        let input = if have == shape.rows {
            next.clone()
        } else {
            match inner.config.warmup {
                WarmupPolicy::Pad => pad(&next, shape, inner.config.pad),
                WarmupPolicy::Reject => {
                    // The rows are kept, so a stream fed one tick at a
                    // time fills up; only the answer is refused.
                    window.replace(&next);
                    if end {
                        inner.remove_if_same(&id, &stream, Removal::Client);
                    }
                    return Err(StreamError::WarmingUp {
                        model: inner.model.clone(),
                        id: id.to_string(),
                        have,
                        window: shape.rows,
                        missing: shape.rows - have,
                    });
                }
            }
        };
        Ok(Turn {
            store: Arc::clone(inner),
            id,
            stream,
            window,
            next,
            input: Some(input),
            end,
            created,
            committed: false,
            _pending: pending,
        })
    }
}

/// `next` (fewer than T rows) padded at the front, the oldest time steps,
/// to T rows.
fn pad(next: &[f32], shape: WindowShape, with: PadWith) -> Vec<f32> {
    let missing = shape.values() - next.len();
    let mut input = Vec::with_capacity(shape.values());
    match with {
        PadWith::Zeros => input.resize(missing, 0.0),
        PadWith::FirstRow => {
            let first = &next[..shape.row_len];
            for _ in 0..missing / shape.row_len {
                input.extend_from_slice(first);
            }
        }
    }
    input.extend_from_slice(next);
    input
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic under the lock leaves the table consistent (every
        // change is a few map operations), so a poisoned lock is usable.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unknown(&self, id: &StreamId) -> StreamError {
        StreamError::Unknown {
            model: self.model.clone(),
            id: id.to_string(),
            idle: self.config.idle_timeout,
        }
    }

    /// Bytes a stream with this id holds: its window at full size and
    /// its id.
    fn footprint(&self, id: &StreamId) -> u64 {
        (self.shape.values() * std::mem::size_of::<f32>() + id.bytes()) as u64
    }

    fn create(&self, table: &mut Table, id: StreamId, now: Instant) -> Arc<Stream> {
        let bytes = self.footprint(&id);
        // Make room: a stream over either cap evicts the least recently
        // used ones (at least one stream always fits).
        while !table.streams.is_empty()
            && (table.streams.len() >= self.config.max_streams
                || table.bytes + bytes > self.config.max_memory_bytes)
        {
            let Some((_, oldest)) = table.lru.pop_first() else {
                break;
            };
            self.drop_slot(table, &oldest, Removal::Capacity);
        }
        let stream = Arc::new(Stream {
            window: Arc::new(tokio::sync::Mutex::new(Window {
                data: Vec::with_capacity(self.shape.values()),
                started: false,
            })),
            live: AtomicBool::new(true),
            pending: AtomicUsize::new(0),
        });
        let last_use = table.next_use;
        table.next_use += 1;
        table.lru.insert(last_use, id.clone());
        table.bytes += bytes;
        table.streams.insert(
            id,
            Slot {
                stream: Arc::clone(&stream),
                last_use,
                last_used_at: now,
                bytes,
            },
        );
        stream
    }

    fn sweep(&self, table: &mut Table, now: Instant) {
        while let Some((_, oldest)) = table.lru.first_key_value() {
            let expired = table.streams.get(oldest).is_none_or(|slot| {
                now.duration_since(slot.last_used_at) >= self.config.idle_timeout
            });
            if !expired {
                break;
            }
            let Some((_, oldest)) = table.lru.pop_first() else {
                break;
            };
            self.drop_slot(table, &oldest, Removal::Idle);
        }
    }

    /// Removes `id` (already out of the use order) from the table.
    fn drop_slot(&self, table: &mut Table, id: &StreamId, why: Removal) {
        if let Some(slot) = table.streams.remove(id) {
            slot.stream.live.store(false, Ordering::Release);
            table.bytes -= slot.bytes;
            let reason = match why {
                Removal::Idle => "idle",
                Removal::Capacity => "capacity",
                Removal::Client => return,
            };
            counter!(telemetry::STREAMS_EVICTED, "model" => self.model.clone(), "version" => self.version.clone(), "reason" => reason)
                .increment(1);
            tracing::debug!(model = %self.model, stream = %id, reason, "stream evicted");
        }
    }

    /// Removes `id` if the table still holds this very stream (and not a
    /// newer one started under the same id).
    fn remove_if_same(&self, id: &StreamId, stream: &Arc<Stream>, why: Removal) {
        let mut table = self.lock();
        let same = table
            .streams
            .get(id)
            .is_some_and(|slot| Arc::ptr_eq(&slot.stream, stream));
        if same {
            if let Some(last_use) = table.streams.get(id).map(|slot| slot.last_use) {
                table.lru.remove(&last_use);
            }
            self.drop_slot(&mut table, id, why);
            self.publish(&table);
        }
        stream.live.store(false, Ordering::Release);
    }

    fn publish(&self, table: &Table) {
        gauge!(telemetry::STREAMS_LIVE, "model" => self.model.clone(), "version" => self.version.clone())
            .set(table.streams.len() as f64);
        gauge!(telemetry::STREAMS_MEMORY, "model" => self.model.clone(), "version" => self.version.clone())
            .set(table.bytes as f64);
    }
}

impl Table {
    /// Marks `id` the most recently used stream.
    fn touch(&mut self, id: &StreamId, now: Instant) {
        let use_now = self.next_use;
        if let Some(slot) = self.streams.get_mut(id) {
            self.lru.remove(&slot.last_use);
            slot.last_use = use_now;
            slot.last_used_at = now;
            self.lru.insert(use_now, id.clone());
            self.next_use += 1;
        }
    }
}

/// Counts a request holding or waiting for a stream, until dropped.
#[derive(Debug)]
struct Pending {
    stream: Arc<Stream>,
    /// The count including this request.
    count: usize,
}

impl Pending {
    fn enter(stream: &Arc<Stream>) -> Self {
        let count = stream.pending.fetch_add(1, Ordering::AcqRel) + 1;
        Pending {
            stream: Arc::clone(stream),
            count,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.stream.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's turn on its stream: holds the stream until the answer.
/// [`Turn::commit`] makes the new window the stream's; dropping the turn
/// leaves the window as it was.
#[derive(Debug)]
pub(crate) struct Turn {
    store: Arc<Inner>,
    id: StreamId,
    stream: Arc<Stream>,
    window: OwnedMutexGuard<Window>,
    next: Vec<f32>,
    input: Option<Vec<f32>>,
    end: bool,
    created: bool,
    committed: bool,
    _pending: Pending,
}

impl Turn {
    /// The model's input: the window, T × F values (padded while warming
    /// up under `warmup = "pad"`). Empty when taken twice.
    pub(crate) fn take_input(&mut self) -> Vec<f32> {
        self.input.take().unwrap_or_default()
    }

    /// The request was answered: the stream advances (or ends).
    pub(crate) fn commit(mut self) {
        let next = std::mem::take(&mut self.next);
        self.window.replace(&next);
        self.committed = true;
        if self.end {
            self.store
                .remove_if_same(&self.id, &self.stream, Removal::Client);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // A start that was not answered leaves no stream behind.
        if !self.committed && self.created && !self.window.started {
            self.store
                .remove_if_same(&self.id, &self.stream, Removal::Client);
        }
    }
}

#[cfg(test)]
mod tests;
