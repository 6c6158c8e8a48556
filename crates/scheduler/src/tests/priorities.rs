//! Priorities, deadlines and admission: classes riding together highest
//! first, timeouts answered by the timer, class timeout caps, admission
//! refusing what cannot meet its deadline, early dispatch for deadlines.

use super::*;

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn requests_arriving_while_the_engine_is_busy_ride_together_highest_class_first() {
    // The first request occupies the engine for 100 ms of real time; the
    // five that arrive meanwhile leave together once it is free, the
    // real-time one first in the batch although it arrived last.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(100));
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let first = send(&scheduler, 0.0, at(5));
    tokio::task::yield_now().await;
    let mut later = Vec::new();
    for (i, level) in [5, 4, 3, 2, 1].into_iter().enumerate() {
        later.push(send(&scheduler, (i + 1) as f32, at(level)));
    }
    assert!(first.await.unwrap().0.is_ok());
    for h in later {
        let (out, _) = h.await.unwrap();
        // Second column: the batch size the request rode in.
        assert_eq!(out.unwrap()[0][1], 5.0);
    }
    assert_eq!(engine.batches(), [1, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_answered_by_the_timer_while_a_long_batch_runs() {
    // Triton #7512: the queued request must not wait for the running
    // batch to end before it is told that its timeout expired.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(300));
    let scheduler = Scheduler::spawn(engine.clone(), config(1));
    let start = Instant::now();
    let long = send(&scheduler, 1.0, at(5));
    tokio::task::yield_now().await;
    let queued = send(&scheduler, 2.0, at_within(5, Duration::from_millis(50)));
    let (result, answered) = queued.await.unwrap();
    match result {
        Err(e @ SchedulerError::TimeoutExpired { .. }) => {
            assert!(e.to_string().contains("request timeout expired"), "{e}");
            assert!(e.retry_after().is_some());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(answered - start, Duration::from_millis(50));
    assert!(long.await.unwrap().0.is_ok());
    // The expired request never ran.
    assert_eq!(engine.batches(), [1]);
    let stats = scheduler.stats();
    assert_eq!(stats.classes[4].expired, 1);
    assert_eq!(stats.classes[4].compute_infer.count, 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_timeout_is_capped_at_its_class_default_and_may_be_forbidden() {
    let engine = FakeEngine::with_busy(false, Duration::from_millis(300));
    let mut cfg = config(1);
    cfg.classes[4].default_timeout = Duration::from_millis(20);
    cfg.classes[0].allow_timeout_override = false;
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let err = scheduler
        .infer(
            1,
            vec![row(1.0)],
            InferOptions {
                priority: Some(Priority::HIGHEST),
                timeout: Some(Duration::from_millis(5)),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err, SchedulerError::TimeoutNotAllowed(Priority::HIGHEST));
    let start = Instant::now();
    let busy = send(&scheduler, 1.0, at(1));
    tokio::task::yield_now().await;
    // Asks for 10 s; its class allows 20 ms.
    let capped = send(&scheduler, 2.0, at_within(5, Duration::from_secs(10)));
    let (result, answered) = capped.await.unwrap();
    assert!(matches!(result, Err(SchedulerError::TimeoutExpired { .. })));
    assert_eq!(answered - start, Duration::from_millis(20));
    assert!(busy.await.unwrap().0.is_ok());
}

#[tokio::test(start_paused = true)]
async fn admission_refuses_a_request_that_cannot_meet_its_deadline() {
    // Teach the latency model that a batch takes ~50 ms, then queue work
    // ahead: a 10 ms request cannot make it and is refused at once, with a
    // retry hint from the measured service rate.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(50));
    let scheduler = Scheduler::spawn(engine.clone(), config(1));
    scheduler.infer(1, vec![row(0.0)], at(3)).await.unwrap();
    until_recorded(&scheduler, 2, 1).await;
    let busy = send(&scheduler, 1.0, at(3));
    until(|| engine.batches().len() == 2).await;
    let start = Instant::now();
    let err = scheduler
        .infer(1, vec![row(2.0)], at_within(3, Duration::from_millis(10)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at arrival");
    match &err {
        SchedulerError::DeadlineUnmeetable {
            retry_after,
            predicted,
            ..
        } => {
            assert!(*predicted > Duration::from_millis(10), "{err}");
            assert!(*retry_after >= Duration::from_millis(1), "{err}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        err.to_string().contains("cannot meet its 10 ms deadline"),
        "{err}"
    );
    assert!(busy.await.unwrap().0.is_ok());
    assert_eq!(scheduler.stats().classes[2].rejected_deadline, 1);
    assert_eq!(engine.batches(), [1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_leaves_early_for_the_earliest_deadline() {
    // Waiting mode with a 1 s delay: only the deadline (100 ms, minus the
    // predicted engine time) makes the batch leave.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(10));
    let mut cfg = waiting_config(8);
    for class in &mut cfg.classes {
        class.max_queue_delay = Duration::from_secs(1);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Train the model: ~10 ms per batch.
    let warm = send(&scheduler, 0.0, at(3));
    let (out, _) = warm.await.unwrap();
    assert!(out.is_ok());
    until_recorded(&scheduler, 2, 1).await;
    let start = Instant::now();
    let (out, answered) = send(&scheduler, 1.0, at_within(3, Duration::from_millis(100)))
        .await
        .unwrap();
    assert!(out.is_ok(), "{out:?}");
    let waited = answered - start;
    assert!(
        // Left before the deadline by about the measured batch time (10 ms
        // plus scheduling noise on a loaded machine), long before the 1 s
        // delay.
        waited < Duration::from_millis(100) && waited >= Duration::from_millis(50),
        "{waited:?}"
    );
}
