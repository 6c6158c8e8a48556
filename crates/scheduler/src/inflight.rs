//! A batch between its first and its last engine call.
//!
//! The batcher takes requests from the queue into an [`InFlight`] batch and
//! hands it to an engine worker, which runs the next *chunk* of its rows
//! (one engine call of at most [`InFlight::chunk`] rows) and hands it back.
//! Between chunks the batch waits in the batcher, where work of a higher
//! class may go first; any worker of the right classes may run its next
//! chunk. A request is answered as soon as its last row is computed, so its
//! rows always come back together and exactly once. A row's output depends
//! only on that row, so chunked results are the same as unchunked ones
//! (the tests check this bit for bit on the real engine).
//!
//! A failed engine call is split in halves and each half retried, down to
//! single rows: only the requests owning a row that fails alone get the
//! error, every other request is answered (issue: an engine that fails on
//! one input, or runs out of memory on a large batch, must not fail the
//! whole batch).

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use tickserve_engine::{Batch, BatchOutput, Engine, EngineError};
use tickserve_telemetry::traces::TRACE_TARGET;
use tokio::time::Instant;

use crate::priority::{ClassSet, Priority};
use crate::{Outputs, Request, SchedulerError};

/// What a chunk did, for the batcher's engine-time fit and the metrics.
#[derive(Debug, Default)]
pub(crate) struct ChunkRun {
    /// Engine calls made (1 unless the chunk failed and was split).
    pub calls: usize,
    /// Calls on halves of a failed call.
    pub retries: usize,
    /// Time spent gathering inputs and in the engine.
    pub gather: Duration,
    pub engine: Duration,
}

/// How one answered request fared, for the latency statistics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answered {
    pub priority: Priority,
    pub arrived: Instant,
    pub ok: bool,
}

#[derive(Debug)]
pub(crate) struct InFlight {
    /// Requests not answered yet, in row order.
    requests: VecDeque<Request>,
    /// Row at which the first request of `requests` starts.
    first_row: usize,
    rows: usize,
    /// Rows computed so far: always a prefix of the batch.
    done: usize,
    /// Rows per engine call.
    chunk: usize,
    /// The best base class in the batch: only strictly higher classes go
    /// ahead of its remaining chunks.
    class: Priority,
    /// The classes of its requests: a reserved worker resumes only a
    /// batch it serves.
    classes: ClassSet,
    /// When its oldest request arrived.
    oldest: Instant,
    /// Output rows not yet handed to their request, per output: row `r` of
    /// the batch is at `r - first_row`.
    outputs: Vec<VecDeque<f32>>,
    /// Per output: values per row (known after the first engine call).
    widths: Vec<usize>,
    /// Per request of `requests`: the error of a row that failed alone.
    failures: VecDeque<Option<EngineError>>,
    /// Engine time spent on the batch so far.
    compute: Duration,
}

impl InFlight {
    /// A batch of `requests` (in row order), run `chunk` rows per call.
    pub fn new(requests: Vec<Request>, chunk: usize) -> Self {
        let rows = requests.iter().map(|r| r.rows).sum();
        let class = requests
            .iter()
            .map(|r| r.priority)
            .min()
            .unwrap_or(Priority::LOWEST);
        let classes = ClassSet::of(requests.iter().map(|r| r.priority));
        let oldest = requests
            .iter()
            .map(|r| r.arrived)
            .min()
            .unwrap_or_else(Instant::now);
        let failures = requests.iter().map(|_| None).collect();
        InFlight {
            requests: requests.into(),
            first_row: 0,
            rows,
            done: 0,
            chunk: chunk.clamp(1, rows.max(1)),
            class,
            classes,
            oldest,
            outputs: Vec::new(),
            widths: Vec::new(),
            failures,
            compute: Duration::ZERO,
        }
    }

    /// Rows still to compute.
    pub fn remaining(&self) -> usize {
        self.rows - self.done
    }

    /// Rows the next engine call runs.
    pub fn next_chunk(&self) -> usize {
        self.chunk.min(self.remaining())
    }

    /// One `engine` span per traced request with rows in the next chunk,
    /// each under that request's span: a batch serves many traces, so each
    /// gets its own span of the same engine call. Empty, and free, when
    /// traces are not exported.
    pub fn engine_spans(&self, worker: usize) -> Vec<tracing::Span> {
        let rows = self.next_chunk();
        let end = self.done + rows;
        let mut start = self.first_row;
        let mut spans = Vec::new();
        for request in &self.requests {
            if start >= end {
                break;
            }
            start += request.rows;
            let parent = &request.spans.parent;
            if parent.is_disabled() {
                continue;
            }
            let span = tracing::info_span!(
                target: TRACE_TARGET,
                parent: parent,
                "engine",
                rows,
                batch_rows = self.rows,
                worker,
                retries = tracing::field::Empty,
            );
            spans.push(span);
        }
        spans
    }

    pub fn class(&self) -> Priority {
        self.class
    }

    pub fn classes(&self) -> ClassSet {
        self.classes
    }

    pub fn oldest(&self) -> Instant {
        self.oldest
    }

    pub fn is_finished(&self) -> bool {
        self.done == self.rows
    }

    /// Whether no client waits for any of its remaining requests.
    pub fn is_abandoned(&self) -> bool {
        self.requests.iter().all(|r| r.response_tx.is_closed())
    }

    /// The requests not answered yet (shutdown, or a worker that is gone).
    pub fn into_requests(self) -> Vec<Request> {
        self.requests.into()
    }

    /// Runs the next chunk on `engine`. The requests it completed are
    /// answered by [`InFlight::answer_complete`].
    pub fn run_chunk(&mut self, engine: &dyn Engine) -> ChunkRun {
        let range = self.done..self.done + self.next_chunk();
        let mut run = ChunkRun::default();
        self.execute(engine, range.clone(), &mut run);
        self.compute += run.engine;
        self.done = range.end;
        run
    }

    /// One engine call on `range`; on failure, each half on its own, down
    /// to single rows.
    fn execute(&mut self, engine: &dyn Engine, range: Range<usize>, run: &mut ChunkRun) {
        run.calls += 1;
        let gathering = std::time::Instant::now();
        let batch = Batch {
            rows: range.len(),
            inputs: self.gather(range.clone()),
        };
        let started = std::time::Instant::now();
        run.gather += started - gathering;
        // A panicking engine must not take the worker (and every later
        // request) down with it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.infer(&batch)))
            .unwrap_or_else(|_| Err(EngineError::Execution("the engine panicked".into())));
        run.engine += started.elapsed();
        let error = match result {
            Ok(output) => match self.store(range.start, &output, range.len()) {
                Ok(()) => return,
                Err(error) => error,
            },
            Err(error) => error,
        };
        if range.len() == 1 {
            self.fail_row(range.start, error);
            return;
        }
        run.retries += 2;
        let middle = range.start + range.len() / 2;
        self.execute(engine, range.start..middle, run);
        self.execute(engine, middle..range.end, run);
    }

    /// The rows of `range`, one contiguous buffer per input.
    fn gather(&self, range: Range<usize>) -> Vec<Vec<f32>> {
        let Some(first) = self.requests.front() else {
            return Vec::new();
        };
        let widths: Vec<usize> = first
            .inputs
            .iter()
            .map(|values| values.len() / first.rows.max(1))
            .collect();
        let mut inputs: Vec<Vec<f32>> = widths
            .iter()
            .map(|w| Vec::with_capacity(w * range.len()))
            .collect();
        let mut start = self.first_row;
        for request in &self.requests {
            let end = start + request.rows;
            let (from, to) = (range.start.max(start), range.end.min(end));
            if from < to {
                for ((gathered, own), width) in inputs.iter_mut().zip(&request.inputs).zip(&widths)
                {
                    gathered.extend_from_slice(&own[(from - start) * width..(to - start) * width]);
                }
            }
            if end >= range.end {
                break;
            }
            start = end;
        }
        inputs
    }

    /// Appends the output rows of the call that started at row `start`.
    fn store(
        &mut self,
        start: usize,
        output: &BatchOutput,
        rows: usize,
    ) -> Result<(), EngineError> {
        if output.rows != rows {
            return Err(EngineError::Execution(format!(
                "engine returned {} rows for a batch of {rows}",
                output.rows
            )));
        }
        if self.widths.is_empty() {
            self.widths = output.outputs.iter().map(|v| v.len() / rows).collect();
            self.outputs = self.widths.iter().map(|_| VecDeque::new()).collect();
        }
        let well_formed = output.outputs.len() == self.widths.len()
            && output
                .outputs
                .iter()
                .zip(&self.widths)
                .all(|(values, width)| values.len() == width * rows);
        if !well_formed {
            return Err(EngineError::Execution(
                "engine returned outputs of the wrong size".into(),
            ));
        }
        self.pad_to(start);
        for (kept, values) in self.outputs.iter_mut().zip(&output.outputs) {
            kept.extend(values.iter().copied());
        }
        Ok(())
    }

    /// Fills the outputs up to row `row` with zeros: the rows of a failed
    /// call, so later rows keep their place. Their requests get the error.
    fn pad_to(&mut self, row: usize) {
        for (kept, width) in self.outputs.iter_mut().zip(&self.widths) {
            let target = (row - self.first_row) * width;
            if kept.len() < target {
                kept.resize(target, 0.0);
            }
        }
    }

    fn fail_row(&mut self, row: usize, error: EngineError) {
        let mut start = self.first_row;
        for (request, failure) in self.requests.iter().zip(self.failures.iter_mut()) {
            let end = start + request.rows;
            if (start..end).contains(&row) {
                failure.get_or_insert(error);
                break;
            }
            start = end;
        }
        // Keep the row's place in the outputs (nothing is stored for it).
        if !self.widths.is_empty() {
            self.pad_to(row + 1);
        }
    }

    /// Answers every request whose rows are all computed; `before_send`
    /// sees each one first (its statistics are then in place when its
    /// client reads them).
    pub fn answer_complete(&mut self, mut before_send: impl FnMut(&Answered)) -> Vec<Answered> {
        let mut answered = Vec::new();
        while let Some(request) = self.requests.front() {
            if self.first_row + request.rows > self.done {
                break;
            }
            let Some(request) = self.requests.pop_front() else {
                break;
            };
            let failure = self.failures.pop_front().flatten();
            let rows = request.rows;
            self.first_row += rows;
            let result: Result<Outputs, SchedulerError> = match failure {
                Some(error) => {
                    self.drain_rows(rows);
                    Err(SchedulerError::Engine(error))
                }
                None => Ok(self.drain_rows(rows)),
            };
            let outcome = Answered {
                priority: request.priority,
                arrived: request.arrived,
                ok: result.is_ok(),
            };
            before_send(&outcome);
            answered.push(outcome);
            // Our hold on the request's span goes before the answer, so the
            // span ends with its handler, not whenever this thread drops it.
            let Request {
                response_tx, spans, ..
            } = request;
            drop(spans);
            // The client may have gone meanwhile; nothing to do then.
            let _ = response_tx.send(result);
        }
        answered
    }

    /// Removes the first `rows` output rows and returns them per output.
    fn drain_rows(&mut self, rows: usize) -> Outputs {
        self.outputs
            .iter_mut()
            .zip(&self.widths)
            .map(|(kept, width)| {
                let take = (rows * width).min(kept.len());
                kept.drain(..take).collect()
            })
            .collect()
    }

    /// Engine time spent on the batch so far.
    pub fn compute(&self) -> Duration {
        self.compute
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::*;
    use crate::tests::{Answers, TestEngine};

    /// Answers each row `[a, b]` with `[a + b, a * b]`; fails every call
    /// that holds a row whose first value is in `poison`.
    #[derive(Debug)]
    struct RowEngine {
        poison: Vec<f32>,
        calls: Mutex<Vec<usize>>,
    }

    impl RowEngine {
        fn new(poison: &[f32]) -> TestEngine<Self> {
            TestEngine::new(RowEngine {
                poison: poison.to_vec(),
                calls: Mutex::new(Vec::new()),
            })
        }
    }

    impl Answers for RowEngine {
        const KIND: &'static str = "rows";
        fn answer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
            self.calls.lock().unwrap().push(batch.rows);
            let rows: Vec<&[f32]> = batch.inputs[0].chunks(2).collect();
            if rows.iter().any(|r| self.poison.contains(&r[0])) {
                return Err(EngineError::Execution("poisoned row".into()));
            }
            Ok(BatchOutput {
                rows: batch.rows,
                outputs: vec![
                    rows.iter()
                        .flat_map(|r| [r[0] + r[1], r[0] * r[1]])
                        .collect(),
                ],
            })
        }
    }

    type Reply = oneshot::Receiver<Result<Outputs, SchedulerError>>;

    /// Requests of the given row counts; row `i` overall is `[i, i + 0.5]`.
    fn requests(sizes: &[usize]) -> (Vec<Request>, Vec<Reply>) {
        let mut next = 0.0f32;
        sizes
            .iter()
            .map(|&rows| {
                let values: Vec<f32> = (0..rows)
                    .flat_map(|_| {
                        let row = [next, next + 0.5];
                        next += 1.0;
                        row
                    })
                    .collect();
                let (response_tx, reply) = oneshot::channel();
                let request = Request {
                    rows,
                    inputs: vec![values],
                    priority: Priority::LOWEST,
                    arrived: Instant::now(),
                    timeout: Duration::from_secs(60),
                    response_tx,
                    predicted_wait: None,
                    spans: crate::RequestSpans::none(),
                };
                (request, reply)
            })
            .unzip()
    }

    fn expected(first: usize, rows: usize) -> Vec<f32> {
        (first..first + rows)
            .flat_map(|i| {
                let (a, b) = (i as f32, i as f32 + 0.5);
                [a + b, a * b]
            })
            .collect()
    }

    fn run_all(batch: &mut InFlight, engine: &TestEngine<RowEngine>) -> (usize, usize) {
        let (mut calls, mut retries) = (0, 0);
        while !batch.is_finished() {
            let run = batch.run_chunk(engine);
            batch.answer_complete(|_| {});
            calls += run.calls;
            retries += run.retries;
        }
        (calls, retries)
    }

    #[test]
    fn chunked_and_unchunked_runs_answer_every_request_with_its_own_rows() {
        let sizes = [3, 1, 4, 1, 5];
        for chunk in [1, 2, 3, 7, 14, 100] {
            let engine = RowEngine::new(&[]);
            let (reqs, mut replies) = requests(&sizes);
            let mut batch = InFlight::new(reqs, chunk);
            run_all(&mut batch, &engine);
            let calls = engine.calls.lock().unwrap().clone();
            assert_eq!(calls.iter().sum::<usize>(), 14, "chunk {chunk}");
            assert!(calls.iter().all(|&c| c <= chunk));
            let mut first = 0;
            for (reply, rows) in replies.iter_mut().zip(sizes) {
                let outputs = reply.try_recv().unwrap().unwrap();
                assert_eq!(outputs, vec![expected(first, rows)], "chunk {chunk}");
                first += rows;
            }
        }
    }

    #[test]
    fn a_request_is_answered_as_soon_as_its_last_row_is_computed() {
        let engine = RowEngine::new(&[]);
        let (reqs, mut replies) = requests(&[2, 3]);
        let mut batch = InFlight::new(reqs, 2);
        batch.run_chunk(&engine);
        assert_eq!(batch.answer_complete(|_| {}).len(), 1);
        assert!(replies[0].try_recv().is_ok());
        assert!(
            replies[1].try_recv().is_err(),
            "second request is not complete"
        );
        batch.run_chunk(&engine);
        assert!(batch.answer_complete(|_| {}).is_empty());
        batch.run_chunk(&engine);
        assert_eq!(batch.answer_complete(|_| {}).len(), 1);
        assert_eq!(
            replies[1].try_recv().unwrap().unwrap(),
            vec![expected(2, 3)]
        );
        assert!(batch.is_finished());
    }

    #[test]
    fn a_failed_call_is_split_until_only_the_failing_rows_fail() {
        // Row 5 (the second row of the third request) is poisoned.
        let engine = RowEngine::new(&[5.0]);
        let sizes = [2, 2, 2, 2];
        let (reqs, mut replies) = requests(&sizes);
        let mut batch = InFlight::new(reqs, 8);
        let (calls, retries) = run_all(&mut batch, &engine);
        // 8 → 4 + 4 → (2 + 2) on the poisoned side → (1 + 1).
        assert_eq!(calls, 7);
        assert_eq!(retries, 6);
        let mut first = 0;
        for (i, (reply, rows)) in replies.iter_mut().zip(sizes).enumerate() {
            let result = reply.try_recv().unwrap();
            if i == 2 {
                assert!(
                    matches!(result, Err(SchedulerError::Engine(_))),
                    "{result:?}"
                );
            } else {
                assert_eq!(result.unwrap(), vec![expected(first, rows)], "request {i}");
            }
            first += rows;
        }
    }

    #[test]
    fn a_failing_first_row_keeps_the_later_rows_in_place() {
        let engine = RowEngine::new(&[0.0]);
        let (reqs, mut replies) = requests(&[1, 2]);
        let mut batch = InFlight::new(reqs, 3);
        run_all(&mut batch, &engine);
        assert!(replies[0].try_recv().unwrap().is_err());
        assert_eq!(
            replies[1].try_recv().unwrap().unwrap(),
            vec![expected(1, 2)]
        );
    }

    #[test]
    fn every_row_failing_fails_every_request_once() {
        let engine = RowEngine::new(&[0.0, 1.0, 2.0]);
        let (reqs, mut replies) = requests(&[1, 2]);
        let mut batch = InFlight::new(reqs, 3);
        run_all(&mut batch, &engine);
        for reply in &mut replies {
            assert!(reply.try_recv().unwrap().is_err());
        }
    }
}
