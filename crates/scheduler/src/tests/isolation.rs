//! Real-time isolation: background batches in chunks with real-time
//! requests between them, reserved instances, shedding lower classes,
//! admission's view of the queue ahead (with [`GatedEngine`] holding the
//! engine busy until a test opens the gate).

use super::*;

/// Answers each row `[a, b]` with `[a + b, a * b]` (a row's answer does not
/// depend on its batch), records every call (worker thread, first values of
/// its rows) and holds every call until the gate opens.
#[derive(Debug)]
struct GatedEngine {
    calls: Mutex<Vec<(String, Vec<f32>)>>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl GatedEngine {
    fn new(open: bool) -> Arc<TestEngine<Self>> {
        Arc::new(TestEngine::new(GatedEngine {
            calls: Mutex::new(Vec::new()),
            open: Mutex::new(open),
            opened: std::sync::Condvar::new(),
        }))
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn close(&self) {
        *self.open.lock().unwrap() = false;
    }

    /// The first value of every row, per call, in call order.
    fn calls(&self) -> Vec<Vec<f32>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, rows)| rows.clone())
            .collect()
    }

    fn calls_by_thread(&self) -> Vec<(String, Vec<f32>)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Answers for GatedEngine {
    const KIND: &'static str = "gated";
    fn answer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        let firsts = batch.inputs[0].chunks(2).map(|r| r[0]).collect();
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        self.calls.lock().unwrap().push((thread, firsts));
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        let out = batch.inputs[0]
            .chunks(2)
            .flat_map(|r| [r[0] + r[1], r[0] * r[1]])
            .collect();
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![out],
        })
    }
}

/// `rows` rows whose first values are `first, first + 1, …`.
fn rows_from(first: f32, rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|i| row(first + i as f32)).collect()
}

fn answer_of(values: &[f32]) -> Vec<f32> {
    values
        .chunks(2)
        .flat_map(|r| [r[0] + r[1], r[0] * r[1]])
        .collect()
}

/// The tests below hold the engine at a gate, so they run on the real
/// clock (on the paused clock, time would jump to the requests' expiry
/// while the engine thread works). The runtime is single-threaded: a task
/// woken before this sleep runs before it ends, so afterwards the batcher
/// has handled everything sent before. Nothing asserts on time.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

type Handle = tokio::task::JoinHandle<Result<Outputs, SchedulerError>>;

fn send_rows(s: &Scheduler, first: f32, rows: usize, level: i64) -> Handle {
    let s = s.clone();
    tokio::spawn(async move { s.infer(rows, vec![rows_from(first, rows)], at(level)).await })
}

/// Sends a request to the empty scheduler and waits until it is the
/// engine's first call, held at the (closed) gate.
async fn send_to_the_gate(
    s: &Scheduler,
    engine: &GatedEngine,
    first: f32,
    rows: usize,
    level: i64,
) -> Handle {
    let sent = send_rows(s, first, rows, level);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    sent
}

/// One real-time request through the (closed) gate: a class with a
/// latency target has traffic, so lower classes now run in chunks. The
/// gate is closed again and the engine's record cleared.
async fn real_time_seen(scheduler: &Scheduler, engine: &GatedEngine) {
    let warm = send_rows(scheduler, 0.5, 1, 1);
    settle().await;
    engine.open();
    warm.await.unwrap().unwrap();
    engine.close();
    engine.calls.lock().unwrap().clear();
}

#[derive(Clone, Copy)]
enum Gate {
    Open,
    Closed,
}

/// A scheduler for batches of up to `max_batch_size` rows that runs them
/// in chunks of `chunk_rows` while a class with a latency target has
/// traffic; with `real_time_target`, the highest class has a 2 ms target.
fn chunking(
    gate: Gate,
    max_batch_size: usize,
    chunk_rows: usize,
    real_time_target: bool,
) -> (Arc<TestEngine<GatedEngine>>, Scheduler) {
    let engine = GatedEngine::new(matches!(gate, Gate::Open));
    let mut cfg = config(max_batch_size);
    if real_time_target {
        cfg.classes[0].target_latency = Some(Duration::from_millis(2));
    }
    cfg.chunk_rows = Some(chunk_rows);
    (engine.clone(), Scheduler::spawn(engine, cfg))
}

#[tokio::test]
async fn a_real_time_request_runs_between_the_chunks_of_a_background_batch() {
    let (engine, scheduler) = chunking(Gate::Closed, 8, 2, true);
    real_time_seen(&scheduler, &engine).await;
    let background = send_to_the_gate(&scheduler, &engine, 100.0, 8, 5).await;
    // The first chunk is in the engine; a real-time request arrives.
    let realtime = send_rows(&scheduler, 1.0, 1, 1);
    settle().await;
    engine.open();
    let realtime = realtime.await.unwrap().unwrap();
    let background = background.await.unwrap().unwrap();
    assert_eq!(
        engine.calls(),
        [
            vec![100.0, 101.0],
            vec![1.0],
            vec![102.0, 103.0],
            vec![104.0, 105.0],
            vec![106.0, 107.0],
        ]
    );
    // Every request got exactly its own rows, as one unchunked call gives.
    assert_eq!(realtime, vec![answer_of(&rows_from(1.0, 1))]);
    assert_eq!(background, vec![answer_of(&rows_from(100.0, 8))]);
}

#[tokio::test]
async fn without_a_target_above_it_a_batch_runs_in_one_call() {
    let (engine, scheduler) = chunking(Gate::Open, 8, 2, false);
    let out = send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(out, vec![answer_of(&rows_from(0.0, 8))]);
    assert_eq!(engine.calls().len(), 1);
}

#[tokio::test]
async fn background_batches_run_in_chunks_only_while_a_targeted_class_has_traffic() {
    let (engine, scheduler) = chunking(Gate::Open, 8, 2, true);
    // No real-time traffic yet: one call.
    send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(engine.calls().len(), 1);
    // A real-time request, then the same background work: four chunks.
    send_rows(&scheduler, 50.0, 1, 1).await.unwrap().unwrap();
    let out = send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(out, vec![answer_of(&rows_from(0.0, 8))]);
    let sizes: Vec<usize> = engine.calls().iter().map(Vec::len).collect();
    assert_eq!(sizes, [8, 1, 2, 2, 2, 2]);
}

#[tokio::test]
async fn chunked_batches_answer_every_request_with_its_rows_once() {
    let (engine, scheduler) = chunking(Gate::Closed, 16, 3, true);
    real_time_seen(&scheduler, &engine).await;
    // One request holds the engine while eleven more (17 rows) queue up;
    // the first ten leave as one batch of 16 rows in chunks of 3, the last
    // one after them.
    let first = send_to_the_gate(&scheduler, &engine, 0.0, 1, 5).await;
    let sizes = [1usize, 3, 2, 1, 4, 1, 1, 1, 1, 1, 1];
    let mut handles = Vec::new();
    let mut start = 10.0;
    for rows in sizes {
        handles.push((start, rows, send_rows(&scheduler, start, rows, 5)));
        start += 10.0;
    }
    settle().await;
    engine.open();
    assert!(first.await.unwrap().is_ok());
    for (start, rows, handle) in handles {
        let out = handle.await.unwrap().unwrap();
        assert_eq!(
            out,
            vec![answer_of(&rows_from(start, rows))],
            "request at {start}"
        );
    }
    let calls = engine.calls();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 3, 3, 3, 3, 3, 1, 1]);
    // Each queued row went to the engine exactly once.
    let mut seen: Vec<f32> = calls[1..].concat();
    seen.sort_by(f32::total_cmp);
    seen.dedup();
    assert_eq!(seen.len(), 17);
}

/// An instance group of one worker, unpinned, for `classes`.
fn one_worker_for(classes: ClassSet) -> InstanceGroup {
    InstanceGroup {
        count: 1,
        classes,
        cores: Vec::new(),
        nice: None,
    }
}

#[tokio::test]
async fn a_reserved_instance_never_takes_other_classes() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(4);
    cfg.instance_groups = vec![
        one_worker_for(ClassSet::ALL),
        one_worker_for(ClassSet::of([Priority::HIGHEST, Priority::new(2).unwrap()])),
    ];
    let plans = cfg.workers();
    assert_eq!(plans.len(), 2);
    assert_eq!(plans[0].classes.len(), 2, "reserved workers come first");
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Rows carry their class in the hundreds: 100 + i for priority 1, …
    let mut handles = Vec::new();
    for round in 0..6 {
        for level in 1..=5 {
            let first = (level * 100 + round * 10) as f32;
            handles.push(send_rows(&scheduler, first, 1 + round as usize % 2, level));
        }
        settle().await;
    }
    engine.open();
    for handle in handles {
        assert!(handle.await.unwrap().is_ok());
    }
    let calls = engine.calls_by_thread();
    let reserved: Vec<_> = calls.iter().filter(|(t, _)| t == "engine-0").collect();
    assert!(
        !reserved.is_empty(),
        "the reserved worker served: {calls:?}"
    );
    for (_, rows) in reserved {
        assert!(
            rows.iter().all(|&v| v < 300.0),
            "reserved worker ran {rows:?}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|(t, rows)| t == "engine-1" && rows.iter().any(|&v| v >= 300.0))
    );
}

#[tokio::test]
async fn idle_workers_of_the_same_classes_are_offered_work_lowest_niceness_first() {
    let engine = GatedEngine::new(true);
    let mut cfg = config(4);
    cfg.instance_groups = vec![
        InstanceGroup {
            nice: Some(19),
            ..one_worker_for(ClassSet::ALL)
        },
        one_worker_for(ClassSet::ALL),
    ];
    let plans = cfg.workers();
    assert_eq!(
        plans.iter().map(|p| p.nice).collect::<Vec<_>>(),
        [None, Some(19)]
    );
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // One request at a time: each time both workers are idle, and the one
    // that finished last (engine-0, first in line) must still be offered
    // the next before the scavenger.
    for i in 0..4 {
        assert!(send_rows(&scheduler, i as f32, 1, 5).await.unwrap().is_ok());
        settle().await;
    }
    let threads: Vec<String> = engine
        .calls_by_thread()
        .into_iter()
        .map(|(thread, _)| thread)
        .collect();
    assert_eq!(threads, ["engine-0"; 4]);
}

#[tokio::test]
async fn while_real_time_requests_are_refused_background_ones_are_shed() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(1);
    cfg.classes[0].max_queue_size = 1;
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let running = send_to_the_gate(&scheduler, &engine, 1.0, 1, 1).await;
    let queued = send_rows(&scheduler, 2.0, 1, 1);
    let waiting_background = send_rows(&scheduler, 9.0, 1, 4);
    settle().await;
    let refused = scheduler.infer(1, vec![row(3.0)], at(1)).await;
    assert!(
        matches!(refused, Err(SchedulerError::QueueFull { .. })),
        "{refused:?}"
    );
    // Background work already waiting is shed with the refusal…
    let shed = waiting_background.await.unwrap().unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    // …and new background work while the window lasts.
    let shed = scheduler.infer(1, vec![row(4.0)], at(5)).await.unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    assert!(shed.to_string().contains("priority 1"), "{shed}");
    assert!(shed.retry_after().is_some());
    engine.open();
    assert!(running.await.unwrap().is_ok());
    assert!(queued.await.unwrap().is_ok());
    assert_eq!(scheduler.stats().classes[4].rejected_queue_full, 1);
    assert_eq!(scheduler.stats().classes[3].rejected_queue_full, 1);
    // The queued background request never ran.
    assert!(engine.calls().iter().all(|rows| rows != &[9.0]));
}

/// One batch size, priority 3 with a 100 ms timeout: one request of
/// priority 3 running at the (closed) gate, one queued behind it.
async fn one_running_one_queued() -> (Arc<TestEngine<GatedEngine>>, Scheduler, Handle, Handle) {
    let engine = GatedEngine::new(false);
    let mut cfg = config(1);
    cfg.classes[2].default_timeout = Duration::from_millis(100);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let running = send_to_the_gate(&scheduler, &engine, 1.0, 1, 3).await;
    let queued = send_rows(&scheduler, 2.0, 1, 3);
    settle().await;
    (engine, scheduler, running, queued)
}

/// Class `class`'s refusals: (deadline unmeetable, queue full).
fn refusals(scheduler: &Scheduler, class: usize) -> (u64, u64) {
    let stats = &scheduler.stats().classes[class];
    (stats.rejected_deadline, stats.rejected_queue_full)
}

// Paused clock: time moves only by `advance` and when every task idles;
// the gate keeps the engine busy without any timer.
#[tokio::test(start_paused = true)]
async fn admission_counts_how_long_the_queue_ahead_has_waited() {
    let (engine, scheduler, running, _queued) = one_running_one_queued().await;
    // No batch has been measured: only the queue's age speaks. The queued
    // request has waited 56 ms of its 100: a newcomer would wait at least
    // as long, more than half of its own 100 ms.
    tokio::time::advance(Duration::from_millis(55)).await;
    let refused = scheduler.infer(1, vec![row(3.0)], at(3)).await.unwrap_err();
    match &refused {
        SchedulerError::DeadlineUnmeetable { predicted, .. } => {
            assert!(*predicted >= Duration::from_millis(56), "{refused}")
        }
        other => panic!("expected a deadline refusal, got {other:?}"),
    }
    // The class's own deadline was refused: lower classes are shed.
    let shed = scheduler.infer(1, vec![row(4.0)], at(5)).await.unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    // A higher class is not held up by the queue below it: admitted.
    let _realtime = send_rows(&scheduler, 5.0, 1, 1);
    settle().await;
    assert_eq!(refusals(&scheduler, 0), (0, 0));
    engine.open();
    assert!(running.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_the_client_shortened_sheds_nothing() {
    let (engine, scheduler, running, _queued) = one_running_one_queued().await;
    tokio::time::advance(Duration::from_millis(30)).await;
    let short = at_within(3, Duration::from_millis(40));
    let refused = scheduler.infer(1, vec![row(3.0)], short).await.unwrap_err();
    assert!(
        matches!(refused, SchedulerError::DeadlineUnmeetable { .. }),
        "{refused:?}"
    );
    // Background work is still admitted. (Queued requests are not awaited:
    // on the paused clock they could expire while the engine thread runs.)
    let _background = send_rows(&scheduler, 4.0, 1, 5);
    settle().await;
    assert_eq!(refusals(&scheduler, 2).0, 1);
    assert_eq!(refusals(&scheduler, 4), (0, 0));
    engine.open();
    assert!(running.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_idle_reserved_worker_does_not_hide_a_batch_due_on_a_general_one() {
    // Waiting mode: a lone background request leaves after its 5 ms class
    // delay. The reserved worker, idle and first in line, has nothing due;
    // the general worker's batch must still be woken for at 5 ms (not at
    // the request's 60 s expiry).
    let engine = FakeEngine::new(false);
    let mut cfg = waiting_config(8);
    cfg.instance_groups = vec![
        one_worker_for(ClassSet::of([Priority::HIGHEST])),
        one_worker_for(ClassSet::ALL),
    ];
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let start = Instant::now();
    let (out, answered) = send(&scheduler, 1.0, at(5)).await.unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(answered - start, Duration::from_millis(5));
}

/// Records the niceness of the thread each call runs on.
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
struct NicenessEngine {
    seen: Mutex<Vec<i32>>,
}

#[cfg(target_os = "linux")]
impl Answers for NicenessEngine {
    const KIND: &'static str = "niceness";
    fn answer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        let nice =
            crate::os_thread::current_nice().map_err(|e| EngineError::Execution(e.to_string()))?;
        self.seen.lock().unwrap().push(nice);
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![batch.inputs[0].clone()],
        })
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_group_runs_background_work_at_its_niceness_and_real_time_work_at_the_thread_s() {
    let base = crate::os_thread::current_nice().unwrap();
    let engine = Arc::new(TestEngine::new(NicenessEngine::default()));
    let mut cfg = config(4);
    cfg.classes[0].target_latency = Some(Duration::from_millis(2));
    cfg.instance_groups = vec![InstanceGroup {
        nice: Some(7),
        ..one_worker_for(ClassSet::ALL)
    }];
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    assert!(send_rows(&scheduler, 1.0, 1, 5).await.unwrap().is_ok());
    assert!(send_rows(&scheduler, 2.0, 1, 1).await.unwrap().is_ok());
    assert!(send_rows(&scheduler, 3.0, 1, 4).await.unwrap().is_ok());
    assert_eq!(*engine.seen.lock().unwrap(), vec![7, base, 7]);
}
