//! The batcher's own arithmetic, without threads: which worker is expected
//! to run which class, and how many rows each worker waits for.

use super::*;

fn classes(levels: &[u8]) -> ClassSet {
    ClassSet::of(levels.iter().filter_map(|&l| Priority::new(i64::from(l))))
}

#[test]
fn a_reserved_worker_takes_its_classes_and_the_general_ones_the_rest() {
    let plans = [classes(&[1, 2]), ClassSet::ALL, ClassSet::ALL];
    let shares = class_shares(&plans);
    assert_eq!(shares[0], [1.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(shares[1], [0.0, 0.0, 0.5, 0.5, 0.5]);
    assert_eq!(shares[2], shares[1]);
}

#[test]
fn general_workers_share_every_class_evenly() {
    let shares = class_shares(&[ClassSet::ALL, ClassSet::ALL]);
    assert_eq!(shares, vec![[0.5; Priority::LEVELS]; 2]);
    assert_eq!(
        class_shares(&[ClassSet::ALL]),
        vec![[1.0; Priority::LEVELS]]
    );
}

/// A batcher with a worker reserved for priorities 1–2 and a general one
/// (their job channels lead nowhere: nothing is dispatched).
fn reserved_and_general() -> Batcher {
    let mut config = SchedulerConfig::new("fill", 32);
    config.adaptive.enabled = false;
    let worker = |classes| {
        let (jobs, _) = std_mpsc::sync_channel(1);
        Worker {
            jobs,
            plan: WorkerPlan {
                classes,
                core: None,
                nice: None,
            },
            busy_until: None,
            sent_at: None,
        }
    };
    let workers = vec![worker(classes(&[1, 2])), worker(ClassSet::ALL)];
    Batcher::new(
        Arc::new(config),
        Arc::new(SchedulerStats::new(32)),
        workers,
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn a_background_flood_does_not_make_the_reserved_worker_wait_for_rows() {
    let mut batcher = reserved_and_general();
    // The same engine-time fit on both: 1 ms a call plus 0.1 ms a row.
    for worker in 0..2 {
        for rows in [1, 8, 16, 32] {
            let took = Duration::from_micros(1000 + 100 * rows as u64);
            batcher.models[worker].record(rows, took);
        }
    }
    // 5 000 background rows a second and 100 real-time ones, for 200 ms.
    let start = Instant::now();
    for ms in 0..200u64 {
        let now = start + Duration::from_millis(ms);
        batcher.arrivals[Priority::LOWEST.index()].record(now, 5);
        if ms % 10 == 0 {
            batcher.arrivals[Priority::HIGHEST.index()].record(now, 1);
        }
    }
    let now = start + Duration::from_millis(200);
    assert_eq!(
        batcher.fill_rows(now, 0),
        1,
        "the reserved worker keeps up with its own classes one row at a time"
    );
    assert!(
        batcher.fill_rows(now, 1) > 1,
        "the general worker waits for rows to keep up with the flood"
    );
}
