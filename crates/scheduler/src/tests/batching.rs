//! Batch formation and delivery: dispatch timing (delay, full batches),
//! every request getting its own rows, abandoned requests, engine errors,
//! queue limits and shutdown.

use super::*;

/// How long one request with nobody else coming waits for its batch,
/// which holds it alone and answers its row.
async fn lone_request_wait(config: SchedulerConfig) -> Duration {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config);
    let start = Instant::now();
    let out = scheduler.infer(1, vec![row(1.0)], NONE).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(out, vec![vec![1001.0, 1.0]]);
    assert_eq!(engine.batches(), [1]);
    waited
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_is_dispatched_at_once() {
    // Work-conserving: nobody else is coming, so waiting is useless.
    assert_eq!(lone_request_wait(config(8)).await, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn without_work_conserving_a_lone_request_waits_exactly_the_delay() {
    assert_eq!(
        lone_request_wait(waiting_config(8)).await,
        Duration::from_millis(5)
    );
}

#[tokio::test(start_paused = true)]
async fn the_delay_counts_from_the_oldest_arrival() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let start = Instant::now();
    let first = tokio::spawn({
        let s = scheduler.clone();
        async move { (s.infer(1, vec![row(1.0)], NONE).await, Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(3)).await;
    let (second, second_at) = (
        scheduler.infer(1, vec![row(2.0)], NONE).await,
        Instant::now(),
    );
    let (first, first_at) = first.await.unwrap();
    // Both left together 5 ms after the FIRST arrival, not 5 ms after the
    // second one.
    assert_eq!(first_at - start, Duration::from_millis(5));
    assert_eq!(second_at - start, Duration::from_millis(5));
    assert_eq!(first.unwrap(), vec![vec![1001.0, 2.0]]);
    assert_eq!(second.unwrap(), vec![vec![2002.0, 2.0]]);
    assert_eq!(engine.batches(), [2]);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_leaves_at_once() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(4));
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)], NONE).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.await.unwrap().unwrap();
        assert_eq!(out, vec![vec![1001.0 * i as f32, 4.0]]);
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a full batch must not wait for the delay"
    );
    assert_eq!(engine.batches(), [4]);
}

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn every_request_gets_exactly_its_own_rows_back() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    // Requests of 1, 2 and 3 rows, values that identify request and row.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let s = scheduler.clone();
            let rows = i % 3 + 1;
            tokio::spawn(async move {
                let input: Vec<f32> = (0..rows).flat_map(|r| row((i * 10 + r) as f32)).collect();
                (i, rows, s.infer(rows, vec![input], NONE).await)
            })
        })
        .collect();
    for h in handles {
        let (i, rows, result) = h.await.unwrap();
        let out = result.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), rows * 2);
        for r in 0..rows {
            assert_eq!(out[0][r * 2], 1001.0 * (i * 10 + r) as f32);
        }
    }
    let batches = engine.batches();
    assert_eq!(batches.iter().sum::<usize>(), 24);
    assert!(batches.iter().all(|&b| b <= 8), "{batches:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_client_left_never_reaches_the_engine() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let abandoned = tokio::spawn({
        let s = scheduler.clone();
        async move {
            s.infer(3, vec![[row(1.0), row(2.0), row(3.0)].concat()], NONE)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    let out = scheduler.infer(1, vec![row(7.0)], NONE).await.unwrap();
    assert_eq!(out, vec![vec![7007.0, 1.0]]);
    // Only the surviving request's single row ran.
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn engine_errors_reach_every_request_of_the_batch() {
    let engine = FakeEngine::new(true);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let a = tokio::spawn({
        let s = scheduler.clone();
        async move { s.infer(1, vec![row(1.0)], NONE).await }
    });
    let b = scheduler
        .infer(2, vec![[row(1.0), row(2.0)].concat()], NONE)
        .await;
    let a = a.await.unwrap();
    for result in [a, b] {
        assert_eq!(
            result.unwrap_err(),
            SchedulerError::Engine(EngineError::Execution("boom".into()))
        );
    }
    // The failed batch was split in halves down to single rows, each of
    // which failed alone.
    assert_eq!(engine.batches(), [3, 1, 2, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn too_many_rows_are_refused_before_queueing() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(4));
    let err = scheduler
        .infer(5, vec![vec![0.0; 10]], NONE)
        .await
        .unwrap_err();
    assert_eq!(err, SchedulerError::TooManyRows { rows: 5, max: 4 });
    assert!(engine.batches().is_empty());
}

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn a_full_queue_refuses_with_queue_full() {
    // The first batch holds the only worker for 200 ms of real time while
    // the other five requests arrive: two fit in the queue, three do not.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(200));
    let mut cfg = config(1);
    for class in &mut cfg.classes {
        class.max_queue_size = 2;
        class.max_queue_delay = Duration::from_secs(1);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Batches of one row run one at a time; fill the engine and the queue.
    let pending: Vec<_> = (0..6)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)], NONE).await })
        })
        .collect();
    let mut refused = 0;
    let mut answered = 0;
    for p in pending {
        match p.await.unwrap() {
            Ok(_) => answered += 1,
            Err(SchedulerError::QueueFull {
                capacity: 2,
                retry_after,
                ..
            }) => {
                assert!(retry_after >= Duration::from_millis(1));
                refused += 1
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((answered, refused), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_flushes_the_queue() {
    let engine = FakeEngine::new(false);
    let mut cfg = waiting_config(8);
    for class in &mut cfg.classes {
        class.max_queue_delay = Duration::from_secs(60);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let start = Instant::now();
    let (tx, rx) = oneshot::channel();
    scheduler
        .command_tx
        .send(SchedulerCommand::Enqueue(Request {
            rows: 1,
            inputs: vec![row(3.0)],
            priority: Priority::LOWEST,
            timeout: Duration::from_secs(3600),
            arrived: Instant::now(),
            response_tx: tx,
            predicted_wait: None,
            spans: crate::RequestSpans::none(),
        }))
        .await
        .unwrap();
    drop(scheduler);
    let out = rx.await.unwrap().unwrap();
    assert_eq!(out, vec![vec![3003.0, 1.0]]);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "shutdown must not wait out the delay"
    );
}
