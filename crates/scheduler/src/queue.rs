//! The batch queue as plain state: no channels, no runtime, no clock of its
//! own. The batcher task ([`crate::batcher`]) feeds it arrivals and the
//! current time and asks it for batches; the tests below drive it directly.
//!
//! Rules:
//! * a request's rows stay together: a request joins a batch only whole;
//! * the oldest request always leads the next batch, later requests fill
//!   the remaining rows in arrival order (one too large to fit is skipped,
//!   and leads a later batch);
//! * a batch is due when the queued rows fill `max_batch_rows`, or when the
//!   oldest request has waited `max_delay` (counted from its arrival, not
//!   from when anyone looked at the queue);
//! * the queue holds at most `capacity` requests; past that a push is
//!   refused and the request goes back to the caller.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Something waiting in the queue.
pub trait Pending {
    /// Rows this request contributes to a batch (≥ 1).
    fn rows(&self) -> usize;
    /// Whether anyone still waits for the answer. Requests whose client
    /// left are dropped instead of batched.
    fn is_wanted(&self) -> bool;
}

#[derive(Debug)]
struct Queued<T> {
    item: T,
    arrived: Instant,
}

/// A batch taken from the queue, oldest request first.
#[derive(Debug)]
pub struct Taken<T> {
    pub items: Vec<(T, Instant)>,
    pub rows: usize,
    /// Requests removed because their client had gone.
    pub dropped: Vec<T>,
}

/// Requests waiting to be batched, in arrival order.
#[derive(Debug)]
pub struct BatchQueue<T> {
    entries: VecDeque<Queued<T>>,
    queued_rows: usize,
    max_batch_rows: usize,
    max_delay: Duration,
    capacity: usize,
}

impl<T: Pending> BatchQueue<T> {
    pub fn new(max_batch_rows: usize, max_delay: Duration, capacity: usize) -> Self {
        BatchQueue {
            entries: VecDeque::new(),
            queued_rows: 0,
            max_batch_rows: max_batch_rows.max(1),
            max_delay,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a request that arrived at `arrived`; hands it back when the
    /// queue is full.
    pub fn push(&mut self, item: T, arrived: Instant) -> Result<(), T> {
        if self.entries.len() >= self.capacity {
            return Err(item);
        }
        self.queued_rows += item.rows();
        self.entries.push_back(Queued { item, arrived });
        Ok(())
    }

    /// When the oldest request's wait runs out; `None` when empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.entries.front().map(|q| q.arrived + self.max_delay)
    }

    /// Whether a batch should leave now: enough rows to fill one, or the
    /// oldest request has waited long enough.
    pub fn is_due(&self, now: Instant) -> bool {
        self.queued_rows >= self.max_batch_rows || self.deadline().is_some_and(|d| d <= now)
    }

    /// Takes the next batch, due or not (the caller decides when). Requests
    /// whose client has gone are removed on the way and returned apart.
    pub fn take(&mut self) -> Taken<T> {
        let mut taken = Taken {
            items: Vec::new(),
            rows: 0,
            dropped: Vec::new(),
        };
        let mut kept = VecDeque::with_capacity(self.entries.len());
        while let Some(queued) = self.entries.pop_front() {
            let rows = queued.item.rows();
            if !queued.item.is_wanted() {
                self.queued_rows -= rows;
                taken.dropped.push(queued.item);
            } else if taken.rows + rows <= self.max_batch_rows {
                self.queued_rows -= rows;
                taken.rows += rows;
                taken.items.push((queued.item, queued.arrived));
            } else {
                kept.push_back(queued);
                if taken.rows == self.max_batch_rows {
                    break;
                }
            }
        }
        // Skipped requests go back in front of the untouched tail, so
        // arrival order is preserved.
        kept.append(&mut self.entries);
        self.entries = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Debug)]
    struct Req {
        id: u32,
        rows: usize,
        wanted: Rc<Cell<bool>>,
    }

    fn req(id: u32, rows: usize) -> Req {
        Req {
            id,
            rows,
            wanted: Rc::new(Cell::new(true)),
        }
    }

    impl Pending for Req {
        fn rows(&self) -> usize {
            self.rows
        }
        fn is_wanted(&self) -> bool {
            self.wanted.get()
        }
    }

    fn ids(taken: &Taken<Req>) -> Vec<u32> {
        taken.items.iter().map(|(r, _)| r.id).collect()
    }

    const DELAY: Duration = Duration::from_millis(5);

    #[test]
    fn the_delay_counts_from_the_oldest_arrival() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(32, DELAY, 100);
        q.push(req(1, 1), t0).unwrap();
        q.push(req(2, 1), t0 + Duration::from_millis(4)).unwrap();
        assert_eq!(q.deadline(), Some(t0 + DELAY));
        assert!(!q.is_due(t0 + Duration::from_millis(4)));
        // Due at the oldest request's deadline even though the newest
        // arrived only 1 ms ago.
        assert!(q.is_due(t0 + DELAY));
        let taken = q.take();
        assert_eq!(ids(&taken), [1, 2]);
        assert!(q.is_empty());
        assert_eq!(q.deadline(), None);
    }

    #[test]
    fn a_full_batch_is_due_at_once() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, DELAY, 100);
        q.push(req(1, 3), t0).unwrap();
        assert!(!q.is_due(t0));
        q.push(req(2, 1), t0).unwrap();
        assert!(q.is_due(t0));
        let taken = q.take();
        assert_eq!(taken.rows, 4);
        assert_eq!(ids(&taken), [1, 2]);
    }

    #[test]
    fn rows_of_a_request_stay_together_and_order_is_kept() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(4, DELAY, 100);
        q.push(req(1, 2), t0).unwrap();
        q.push(req(2, 3), t0).unwrap(); // does not fit after 1
        q.push(req(3, 2), t0).unwrap(); // fills the batch
        q.push(req(4, 1), t0).unwrap();
        let first = q.take();
        assert_eq!(ids(&first), [1, 3]);
        assert_eq!(first.rows, 4);
        // The skipped request now leads, ahead of later arrivals.
        let second = q.take();
        assert_eq!(ids(&second), [2, 4]);
        assert_eq!(second.rows, 4);
        assert!(q.is_empty());
    }

    #[test]
    fn requests_whose_client_left_are_dropped_not_batched() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(8, DELAY, 100);
        let gone = req(1, 2);
        gone.wanted.set(false);
        q.push(gone, t0).unwrap();
        q.push(req(2, 1), t0).unwrap();
        let taken = q.take();
        assert_eq!(ids(&taken), [2]);
        assert_eq!(taken.dropped.len(), 1);
        assert_eq!(taken.dropped[0].id, 1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_refuses_and_hands_the_request_back() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(8, DELAY, 2);
        q.push(req(1, 1), t0).unwrap();
        q.push(req(2, 1), t0).unwrap();
        let refused = q.push(req(3, 1), t0).unwrap_err();
        assert_eq!(refused.id, 3);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn queued_rows_are_tracked_through_takes() {
        let t0 = Instant::now();
        let mut q = BatchQueue::new(3, DELAY, 100);
        for id in 0..7 {
            q.push(req(id, 1), t0).unwrap();
        }
        assert!(q.is_due(t0));
        assert_eq!(q.take().rows, 3);
        assert_eq!(q.take().rows, 3);
        // One row left: not full, so not due before its deadline.
        assert!(!q.is_due(t0));
        assert!(q.is_due(t0 + DELAY));
        assert_eq!(ids(&q.take()), [6]);
    }
}
