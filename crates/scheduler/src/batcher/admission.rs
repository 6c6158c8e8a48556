//! Admission: whether a new request can meet its deadline behind the work
//! ahead of it, and the service rate, drain time and `Retry-After` that
//! decision rests on; shedding of lower classes while a higher one is
//! refused for capacity (docs/scheduling.md, "Admission control and
//! backpressure").

use std::time::Duration;

use tokio::time::Instant;

use super::{Batcher, SHED_WINDOW};
use crate::priority::Priority;
use crate::{Request, SchedulerError};

impl Batcher {
    /// Rows per second all instances serve at the live batch size; `None`
    /// before the first batch has been measured.
    ///
    /// The engine-time fit sees only engine calls. Each call also costs the
    /// hand-over to and from its worker thread, which is negligible on idle
    /// cores but not when the protocol front end (or anything else) keeps
    /// every core busy: then the worker and this task wait for a core
    /// before and after each call, and a rate from the fit alone admitted
    /// twice the work that could be served (docs/scheduling.md, "Overload").
    /// So each call counts its measured overhead too.
    fn service_rate(&self) -> Option<f64> {
        let full = self.model_for(None).predict(self.live_max).as_secs_f64();
        (full > 0.0).then(|| {
            self.workers.len().max(1) as f64 * self.live_max as f64 / (full + self.call_overhead)
        })
    }

    /// How long until some worker is free (zero when one is idle). With
    /// chunked batches that is the end of the running chunk.
    pub(super) fn until_a_worker_is_free(&self, now: Instant) -> Duration {
        if !self.idle.is_empty() {
            return Duration::ZERO;
        }
        self.workers
            .iter()
            .filter_map(|w| w.busy_until)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::ZERO)
    }

    /// Time to work off `rows` queued rows, plus the running chunks.
    fn drain_time(&self, now: Instant, rows: usize) -> Option<Duration> {
        let rate = self.service_rate()?;
        Some(self.until_a_worker_is_free(now) + Duration::from_secs_f64(rows as f64 / rate))
    }

    /// Rows a new request of class `priority` has ahead of it: waiting
    /// rows of its class and above, and the rest of parked batches it
    /// cannot go ahead of.
    fn rows_ahead(&self, priority: Priority) -> usize {
        let parked: usize = self
            .parked
            .iter()
            .filter(|b| b.class() <= priority)
            .map(|b| b.remaining())
            .sum();
        self.queue.rows_at_or_above(priority) + parked
    }

    /// Retry-After for a refused client: when the queue as it stands now
    /// would be worked off at the measured service rate.
    pub(super) fn retry_after(&self, now: Instant, priority: Priority) -> Duration {
        self.drain_time(now, self.queue.rows())
            .unwrap_or(self.config.class(priority).max_queue_delay)
            .max(Duration::from_millis(1))
    }

    /// A higher class refused for capacity within [`SHED_WINDOW`], if any:
    /// requests of lower classes are then refused at once.
    fn shed_by(&self, now: Instant, priority: Priority) -> Option<Priority> {
        Priority::ALL[..priority.index()].iter().copied().find(|p| {
            self.refused_at[p.index()]
                .is_some_and(|at| now.saturating_duration_since(at) < SHED_WINDOW)
        })
    }

    pub(super) fn admit(&mut self, mut request: Request) {
        let now = Instant::now();
        let priority = request.priority;
        self.arrivals[priority.index()].record(now, request.rows);
        self.interval_rows[priority.index()] += request.rows;
        self.arrived_at[priority.index()] = Some(now);
        let class_stats = self.stats.class(priority);
        let metrics = &self.class_metrics[priority.index()];
        let deadline = request.arrived + request.timeout;
        // Under overload the lowest classes go first: while a higher class
        // is being refused, a lower one would only wait for capacity that
        // is not there.
        if let Some(higher) = self.shed_by(now, priority) {
            class_stats.count_rejected_queue_full();
            metrics.rejected_shed.increment(1);
            let error = SchedulerError::Shed {
                model: self.config.model.clone(),
                priority,
                higher,
                retry_after: self.retry_after(now, priority),
            };
            let _ = request.response_tx.send(Err(error));
            return;
        }
        // Admission: the rows of this and every higher class go first; if
        // working them off plus this request's own batch ends past the
        // deadline, answer now rather than late.
        let ahead = self.rows_ahead(priority);
        let drain = self.drain_time(now, ahead);
        // The engine-time fit knows nothing of the cores the protocol
        // front end takes from the engine under load; the queue's own age
        // does: a newcomer waits at least as long as the oldest request
        // ahead of it has waited so far.
        let sojourn = self
            .queue
            .oldest_at_or_above(priority)
            .map(|at| now.saturating_duration_since(at));
        if drain.is_some() || sojourn.is_some() {
            let predicted = drain.unwrap_or_default().max(sojourn.unwrap_or_default());
            request.predicted_wait =
                Some((now + predicted).saturating_duration_since(request.arrived));
            let wait = predicted.mul_f64(self.wait_scales[priority.index()].get());
            let own = self.model_for(None).predict(request.rows)
                + Duration::from_secs_f64(self.call_overhead);
            let finish = now + wait + own;
            // Admitted requests must meet their deadline although the
            // prediction is a point estimate: the queue ahead may take at
            // most half of what is left of the timeout.
            let margin = deadline.saturating_duration_since(now) / 2;
            if finish + margin > deadline {
                class_stats.count_rejected_deadline();
                metrics.rejected_deadline.increment(1);
                let error = SchedulerError::DeadlineUnmeetable {
                    model: self.config.model.clone(),
                    priority,
                    timeout: request.timeout,
                    predicted: finish.saturating_duration_since(request.arrived),
                    retry_after: self.retry_after(now, priority),
                };
                let _ = request.response_tx.send(Err(error));
                // A deadline the client shortened says nothing about
                // capacity; the class's own one does.
                if request.timeout >= self.config.class(priority).default_timeout {
                    self.refused(now, priority);
                }
                return;
            }
        }
        let arrived = request.arrived;
        if let Err(request) = self.queue.push(request, priority, arrived, deadline) {
            class_stats.count_rejected_queue_full();
            metrics.rejected_queue_full.increment(1);
            let error = SchedulerError::QueueFull {
                model: self.config.model.clone(),
                priority,
                capacity: self.config.class(priority).max_queue_size,
                retry_after: self.retry_after(now, priority),
            };
            let _ = request.response_tx.send(Err(error));
            self.refused(now, priority);
        }
    }

    /// A request of `priority` was refused for capacity: lower classes are
    /// shed for [`SHED_WINDOW`], those already waiting at once (they would
    /// only take engine time, through the starvation guard, from the class
    /// that is being refused).
    fn refused(&mut self, now: Instant, priority: Priority) {
        self.refused_at[priority.index()] = Some(now);
        for lower in &Priority::ALL[priority.index() + 1..] {
            let shed = self.queue.drain_class(*lower);
            if shed.is_empty() {
                continue;
            }
            let retry_after = self.retry_after(now, *lower);
            for request in shed {
                self.stats.class(*lower).count_rejected_queue_full();
                self.class_metrics[lower.index()].rejected_shed.increment(1);
                let error = SchedulerError::Shed {
                    model: self.config.model.clone(),
                    priority: *lower,
                    higher: priority,
                    retry_after,
                };
                let _ = request.response_tx.send(Err(error));
            }
        }
    }
}
