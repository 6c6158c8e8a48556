//! The batch queue as plain state: no channels, no runtime, no clock of its
//! own. The batcher task ([`crate::batcher`]) feeds it arrivals and the
//! current time and asks it for batches; the tests below drive it directly.
//!
//! Rules:
//! * one FIFO per request class (base [`Priority`]), each capped at its
//!   class's `max_queue_size`: past it a push is refused and the request
//!   goes back to the caller;
//! * a batch takes requests in order of *effective* priority (base priority
//!   raised by [`Aging`]), oldest first within a level, and fills the rows
//!   left over with lower classes (mixed-priority padding), so a waiting
//!   real-time request never sits behind a full background batch;
//! * starvation guard: a request that has gained every aging level it can
//!   is *starving*; the oldest starving request leads every batch (every
//!   other batch when the live batch size is 1, so that starving requests
//!   never take the whole engine). With aging capped at two levels this is
//!   what bounds the wait of a priority-5 request under a saturating
//!   priority-1 stream;
//! * latency budgets: a batch holding a request of a class with a
//!   `target_latency` takes requests of lower classes only while the
//!   predicted engine time of the batch still ends before that request's
//!   `arrived + target`; the first lower-class request that would break it
//!   ends the batch ([`BatchLimits`]);
//! * reserved instances: a batch is taken for a set of classes
//!   ([`ClassSet`]) and holds only requests of those classes;
//! * a request's rows stay together: a request joins a batch only whole
//!   (one too large for the rows left is skipped and stays queued); the
//!   request leading a batch always goes, even when it alone exceeds the
//!   live (adaptive) batch size;
//! * every request has a deadline; [`PriorityQueue::expire`] removes the
//!   expired ones and [`PriorityQueue::take`] never hands one out;
//! * [`PriorityQueue::next_dispatch`] says when the next batch is due: at
//!   once when enough rows wait, else when the first class delay (counted
//!   from that request's arrival) runs out, or when waiting longer would
//!   make the earliest deadline miss given the predicted engine time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::priority::{Aging, ClassSet, Priority};

/// Something waiting in the queue.
pub trait Pending {
    /// Rows this request contributes to a batch (≥ 1).
    fn rows(&self) -> usize;
    /// Whether anyone still waits for the answer. Requests whose client
    /// left are dropped instead of batched.
    fn is_wanted(&self) -> bool;
}

#[derive(Debug)]
struct Entry<T> {
    item: T,
    rows: usize,
    arrived: Instant,
    deadline: Instant,
}

/// One request of a batch.
#[derive(Debug)]
pub struct Chosen<T> {
    pub item: T,
    pub priority: Priority,
    pub arrived: Instant,
}

/// What bounds one batch besides what waits.
#[derive(Clone, Copy)]
pub struct BatchLimits<'a> {
    /// Most rows (the request leading the batch always goes, whatever its
    /// size).
    pub max_rows: usize,
    /// The classes the taking instance serves.
    pub classes: ClassSet,
    /// Per class (index 0 = priority 1): its latency target, if any.
    pub targets: [Option<Duration>; Priority::LEVELS],
    /// Predicted engine time of a batch of `n` rows.
    pub predict: &'a dyn Fn(usize) -> Duration,
}

fn no_time(_rows: usize) -> Duration {
    Duration::ZERO
}

impl BatchLimits<'static> {
    /// Rows only: every class, no latency budget.
    pub fn rows(max_rows: usize) -> Self {
        BatchLimits {
            max_rows,
            classes: ClassSet::ALL,
            targets: [None; Priority::LEVELS],
            predict: &no_time,
        }
    }
}

impl std::fmt::Debug for BatchLimits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLimits")
            .field("max_rows", &self.max_rows)
            .field("classes", &self.classes)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// A batch taken from the queue, in the order it was chosen.
#[derive(Debug)]
pub struct Taken<T> {
    pub items: Vec<Chosen<T>>,
    pub rows: usize,
    /// Requests removed because their client had gone.
    pub dropped: Vec<T>,
    /// Requests removed because their deadline had passed.
    pub expired: Vec<(T, Priority)>,
}

/// Requests waiting to be batched, one FIFO per class.
#[derive(Debug)]
pub struct PriorityQueue<T> {
    /// Per class, by arrival sequence number (= arrival order).
    classes: [BTreeMap<u64, Entry<T>>; Priority::LEVELS],
    class_rows: [usize; Priority::LEVELS],
    deadlines: BTreeSet<(Instant, u64, usize)>,
    delays: [Duration; Priority::LEVELS],
    capacities: [usize; Priority::LEVELS],
    aging: Aging,
    next_seq: u64,
    /// Whether the last batch of at most one request was led by the
    /// starvation guard (see [`PriorityQueue::take`]).
    guard_led_last_single: bool,
}

impl<T: Pending> PriorityQueue<T> {
    pub fn new(
        delays: [Duration; Priority::LEVELS],
        capacities: [usize; Priority::LEVELS],
        aging: Aging,
    ) -> Self {
        PriorityQueue {
            classes: Default::default(),
            class_rows: [0; Priority::LEVELS],
            deadlines: BTreeSet::new(),
            delays,
            capacities,
            aging,
            next_seq: 0,
            guard_led_last_single: false,
        }
    }

    pub fn len(&self) -> usize {
        self.classes.iter().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.iter().all(BTreeMap::is_empty)
    }

    /// Requests of class `priority` waiting.
    pub fn len_of(&self, priority: Priority) -> usize {
        self.classes[priority.index()].len()
    }

    /// Rows waiting, all classes.
    pub fn rows(&self) -> usize {
        self.class_rows.iter().sum()
    }

    /// Rows waiting in the classes of `classes`.
    pub fn rows_in(&self, classes: ClassSet) -> usize {
        classes.iter().map(|p| self.class_rows[p.index()]).sum()
    }

    /// Whether nothing of the classes of `classes` waits.
    pub fn is_empty_in(&self, classes: ClassSet) -> bool {
        classes.iter().all(|p| self.classes[p.index()].is_empty())
    }

    /// The highest effective priority (aging counted) of any request of
    /// `classes` waiting: what a batch taken now for them would lead with.
    pub fn best_waiting(&self, now: Instant, classes: ClassSet) -> Option<Priority> {
        classes
            .iter()
            .filter_map(|p| {
                let oldest = self.classes[p.index()].values().next()?;
                Some(
                    self.aging
                        .effective(p, now.saturating_duration_since(oldest.arrived)),
                )
            })
            .min()
    }

    /// When the oldest request of class `priority` or any higher class
    /// arrived: how long the queue ahead of a new request of that class
    /// has been waiting.
    pub fn oldest_at_or_above(&self, priority: Priority) -> Option<Instant> {
        self.classes[..=priority.index()]
            .iter()
            .filter_map(|class| class.values().next().map(|e| e.arrived))
            .min()
    }

    /// Rows of class `priority` and every higher class: what a new request
    /// of that class has ahead of it (aging can only add to this).
    pub fn rows_at_or_above(&self, priority: Priority) -> usize {
        self.class_rows[..=priority.index()].iter().sum()
    }

    /// Adds a request of class `priority`; hands it back when that class's
    /// queue is full.
    pub fn push(
        &mut self,
        item: T,
        priority: Priority,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<(), T> {
        let class = priority.index();
        if self.classes[class].len() >= self.capacities[class] {
            return Err(item);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let rows = item.rows();
        self.class_rows[class] += rows;
        self.deadlines.insert((deadline, seq, class));
        self.classes[class].insert(
            seq,
            Entry {
                item,
                rows,
                arrived,
                deadline,
            },
        );
        Ok(())
    }

    fn remove(&mut self, class: usize, seq: u64) -> Option<Entry<T>> {
        let entry = self.classes[class].remove(&seq)?;
        self.class_rows[class] -= entry.rows;
        self.deadlines.remove(&(entry.deadline, seq, class));
        Some(entry)
    }

    /// The earliest deadline of any waiting request.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }

    /// Removes every request whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(T, Priority)> {
        let mut expired = Vec::new();
        while let Some(&(deadline, seq, class)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(entry) = self.remove(class, seq) {
                expired.push((entry.item, Priority::ALL[class]));
            } else {
                self.deadlines.pop_first();
            }
        }
        expired
    }

    /// When the first class delay runs out: the earliest `arrived +
    /// max_queue_delay` over the oldest request of every class.
    pub fn delay_expires(&self) -> Option<Instant> {
        self.delay_expires_in(ClassSet::ALL)
    }

    fn delay_expires_in(&self, classes: ClassSet) -> Option<Instant> {
        classes
            .iter()
            .filter_map(|p| {
                let oldest = self.classes[p.index()].values().next()?;
                Some(oldest.arrived + self.delays[p.index()])
            })
            .min()
    }

    /// The earliest deadline of a waiting request of `classes`.
    fn next_expiry_in(&self, classes: ClassSet) -> Option<Instant> {
        self.deadlines
            .iter()
            .find(|(_, _, class)| classes.contains(Priority::ALL[*class]))
            .map(|(d, _, _)| *d)
    }

    /// When the next batch should leave (at or before `now`: at once);
    /// `None` when nothing waits.
    ///
    /// * `fill_rows`: rows worth waiting for. The batcher passes what the
    ///   measured arrival rate makes useful (1 for a lone client, so it
    ///   never waits) or the live max batch size when work-conserving
    ///   dispatch is off;
    /// * `exec`: the predicted engine time of the batch, so that the batch
    ///   leaves early enough for the earliest deadline.
    pub fn next_dispatch(&self, now: Instant, fill_rows: usize, exec: Duration) -> Option<Instant> {
        self.next_dispatch_in(now, ClassSet::ALL, fill_rows, exec)
    }

    /// [`PriorityQueue::next_dispatch`] for an instance that serves only
    /// `classes`.
    pub fn next_dispatch_in(
        &self,
        now: Instant,
        classes: ClassSet,
        fill_rows: usize,
        exec: Duration,
    ) -> Option<Instant> {
        let delay = self.delay_expires_in(classes)?;
        if self.rows_in(classes) >= fill_rows.max(1) {
            return Some(now);
        }
        let for_deadline = self
            .next_expiry_in(classes)
            .map(|d| d.checked_sub(exec).unwrap_or(d));
        Some(for_deadline.map_or(delay, |d| d.min(delay)))
    }

    /// The oldest request of `classes` that has gained every aging level,
    /// if any.
    fn starving(&self, now: Instant, classes: ClassSet) -> Option<(usize, u64)> {
        let after = self.aging.fully_aged_after();
        self.classes
            .iter()
            .enumerate()
            .filter(|(class, _)| classes.contains(Priority::ALL[*class]))
            .filter_map(|(class, entries)| {
                let (seq, entry) = entries.iter().next()?;
                (now.saturating_duration_since(entry.arrived) >= after).then_some((
                    entry.arrived,
                    *seq,
                    class,
                ))
            })
            .min()
            .map(|(_, seq, class)| (class, seq))
    }

    /// Takes the next batch of at most `max_rows` rows, due or not (the
    /// caller decides when). Expired requests and requests whose client has
    /// gone are removed on the way and returned apart.
    pub fn take(&mut self, now: Instant, max_rows: usize) -> Taken<T> {
        self.take_within(now, &BatchLimits::rows(max_rows))
    }

    /// Takes the next batch within `limits`: only classes it names, at most
    /// its rows, and lower classes only while the latency budget of the
    /// targeted classes in the batch holds.
    pub fn take_within(&mut self, now: Instant, limits: &BatchLimits<'_>) -> Taken<T> {
        let expired = self.expire(now);
        let mut limit = limits.max_rows.max(1);
        let mut chosen: Vec<(usize, u64)> = Vec::new();
        let mut gone: Vec<(usize, u64)> = Vec::new();
        let mut rows = 0;
        // The best class in the batch, and the earliest `arrived + target`
        // of its requests with a latency target.
        let mut best_class = usize::MAX;
        let mut budget: Option<Instant> = None;
        // The guard takes one place per batch: at most 1/max_rows of the
        // engine. A batch of one row would hand it the whole engine, so
        // then it leads every other batch only (at most half).
        let mut starving = self.starving(now, limits.classes);
        if limit == 1 {
            if self.guard_led_last_single {
                starving = None;
            }
            self.guard_led_last_single = starving.is_some();
        }
        {
            let mut consider = |class: usize, seq: u64, entry: &Entry<T>| -> bool {
                if !entry.item.is_wanted() {
                    gone.push((class, seq));
                    return false;
                }
                if !chosen.is_empty() {
                    if rows + entry.rows > limit {
                        return false;
                    }
                    let padding = class > best_class;
                    let predicted_end = now + (limits.predict)(rows + entry.rows);
                    if padding && budget.is_some_and(|by| predicted_end > by) {
                        // Rows of lower classes only come after this one in
                        // the scan, and more rows only take longer: the
                        // batch is complete.
                        return true;
                    }
                }
                limit = limit.max(entry.rows);
                rows += entry.rows;
                chosen.push((class, seq));
                best_class = best_class.min(class);
                if let Some(target) = limits.targets[class] {
                    let by = entry.arrived + target;
                    budget = Some(budget.map_or(by, |b| b.min(by)));
                }
                rows >= limit
            };
            let mut full = false;
            if let Some((class, seq)) = starving
                && let Some(entry) = self.classes[class].get(&seq)
            {
                full = consider(class, seq, entry);
            }
            let mut cursors: Vec<_> = self.classes.iter().map(|c| c.iter().peekable()).collect();
            while !full {
                let best = cursors
                    .iter_mut()
                    .enumerate()
                    .filter(|(class, _)| limits.classes.contains(Priority::ALL[*class]))
                    .filter_map(|(class, cursor)| {
                        let (seq, entry) = cursor.peek()?;
                        let waited = now.saturating_duration_since(entry.arrived);
                        let effective = self.aging.effective(Priority::ALL[class], waited);
                        Some(((effective, entry.arrived, **seq), class))
                    })
                    .min();
                let Some((_, class)) = best else { break };
                let Some((&seq, entry)) = cursors[class].next() else {
                    break;
                };
                if starving == Some((class, seq)) {
                    continue;
                }
                full = consider(class, seq, entry);
            }
        }
        let mut taken = Taken {
            items: Vec::with_capacity(chosen.len()),
            rows,
            dropped: Vec::with_capacity(gone.len()),
            expired,
        };
        for (class, seq) in chosen {
            if let Some(entry) = self.remove(class, seq) {
                taken.items.push(Chosen {
                    item: entry.item,
                    priority: Priority::ALL[class],
                    arrived: entry.arrived,
                });
            }
        }
        for (class, seq) in gone {
            if let Some(entry) = self.remove(class, seq) {
                taken.dropped.push(entry.item);
            }
        }
        taken
    }

    /// Removes every request of class `priority`.
    pub fn drain_class(&mut self, priority: Priority) -> Vec<T> {
        let class = priority.index();
        let entries = std::mem::take(&mut self.classes[class]);
        self.class_rows[class] = 0;
        self.deadlines.retain(|(_, _, c)| *c != class);
        entries.into_values().map(|e| e.item).collect()
    }

    /// Removes everything (shutdown without an engine).
    pub fn drain(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len());
        for class in &mut self.classes {
            all.extend(std::mem::take(class).into_values().map(|e| e.item));
        }
        self.class_rows = [0; Priority::LEVELS];
        self.deadlines.clear();
        all
    }
}

#[cfg(test)]
mod tests;
