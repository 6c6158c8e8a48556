//! The store on tokio's paused clock: windows, warm-up, ordering, caps,
//! idle timeout.

use std::sync::Arc;
use std::time::Duration;

use super::*;

/// T = 3 rows of F = 2 values: 24 bytes a window.
const SHAPE: WindowShape = WindowShape {
    rows: 3,
    row_len: 2,
};

fn config() -> StreamConfig {
    StreamConfig {
        warmup: WarmupPolicy::Pad,
        ..StreamConfig::default()
    }
}

fn store(config: StreamConfig) -> StreamStore {
    StreamStore::new("m", 1, SHAPE, config)
}

/// A store with [`config`] changed by `change`.
fn store_with(change: impl FnOnce(&mut StreamConfig)) -> StreamStore {
    let mut config = config();
    change(&mut config);
    store(config)
}

fn n(id: u64) -> StreamId {
    StreamId::Number(id)
}

/// One row per value: row `v` is `[v, v + 0.5]`.
fn rows(values: &[f32]) -> Vec<f32> {
    values.iter().flat_map(|&v| [v, v + 0.5]).collect()
}

/// Why a tick (`start` or not) on stream `id` is refused.
async fn refusal(store: &StreamStore, id: u64, start: bool, values: &[f32]) -> StreamError {
    store
        .begin(n(id), start, false, rows(values))
        .await
        .unwrap_err()
}

/// A tick without `sequence_start` on stream `id` is refused as unknown.
async fn assert_unknown(store: &StreamStore, id: u64, values: &[f32]) {
    let err = refusal(store, id, false, values).await;
    assert!(matches!(err, StreamError::Unknown { .. }), "{err:?}");
}

/// Asserts a warm-up refusal that counts `have` rows, `missing` short.
fn assert_warming_up(err: &StreamError, have: usize, missing: usize) {
    assert!(
        matches!(err, StreamError::WarmingUp { have: h, missing: m, .. } if (*h, *m) == (have, missing)),
        "{err:?}"
    );
}

/// Takes the turn's input and commits it.
fn apply(mut turn: Turn) -> Vec<f32> {
    let input = turn.take_input();
    turn.commit();
    input
}

/// Appends and commits; the model's input must be the rows of `window`.
async fn assert_window(store: &StreamStore, id: u64, start: bool, values: &[f32], window: &[f32]) {
    assert_eq!(append(store, id, start, values).await, rows(window));
}

/// Appends and commits; returns the model's input.
async fn append(store: &StreamStore, id: u64, start: bool, values: &[f32]) -> Vec<f32> {
    apply(
        store
            .begin(n(id), start, false, rows(values))
            .await
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn the_window_rolls_and_pads_with_zeros_while_short() {
    let store = store(config());
    assert_eq!(
        append(&store, 1, true, &[1.0]).await,
        [vec![0.0; 4], rows(&[1.0])].concat()
    );
    assert_window(&store, 1, false, &[2.0, 3.0], &[1.0, 2.0, 3.0]).await;
    assert_window(&store, 1, false, &[4.0], &[2.0, 3.0, 4.0]).await;
    assert_window(&store, 1, false, &[5.0, 6.0, 7.0], &[5.0, 6.0, 7.0]).await;
    // A start resets the window to its own rows.
    assert_window(&store, 1, true, &[8.0, 9.0, 10.0], &[8.0, 9.0, 10.0]).await;
    assert_eq!(store.usage(), (1, 24));
}

#[tokio::test(start_paused = true)]
async fn padding_with_the_first_row_repeats_the_oldest_row() {
    let store = store_with(|c| c.pad = PadWith::FirstRow);
    assert_window(&store, 1, true, &[1.0], &[1.0, 1.0, 1.0]).await;
    assert_window(&store, 1, false, &[2.0], &[1.0, 1.0, 2.0]).await;
}

#[tokio::test(start_paused = true)]
async fn reject_keeps_the_rows_and_says_how_many_are_missing() {
    let store = store(StreamConfig::default());
    let err = refusal(&store, 1, true, &[1.0]).await;
    assert_warming_up(&err, 1, 2);
    assert!(err.to_string().contains("2 more rows"), "{err}");
    let err = refusal(&store, 1, false, &[2.0]).await;
    assert_warming_up(&err, 2, 1);
    assert_window(&store, 1, false, &[3.0], &[1.0, 2.0, 3.0]).await;
}

#[tokio::test(start_paused = true)]
async fn a_turn_dropped_without_commit_leaves_the_window_unchanged() {
    let store = store(config());
    append(&store, 1, true, &[1.0, 2.0, 3.0]).await;
    let mut turn = store.begin(n(1), false, false, rows(&[4.0])).await.unwrap();
    assert_eq!(turn.take_input(), rows(&[2.0, 3.0, 4.0]));
    drop(turn);
    // The same for a restart and an end that were not answered.
    drop(store.begin(n(1), true, true, rows(&[9.0])).await.unwrap());
    assert_window(&store, 1, false, &[5.0], &[2.0, 3.0, 5.0]).await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_start_leaves_no_stream() {
    let store = store(config());
    drop(store.begin(n(1), true, false, rows(&[1.0])).await.unwrap());
    assert_eq!(store.usage(), (0, 0));
    assert_unknown(&store, 1, &[1.0]).await;
}

#[tokio::test(start_paused = true)]
async fn unknown_and_ended_streams_are_refused() {
    let store = store(config());
    let err = refusal(&store, 1, false, &[1.0]).await;
    assert!(err.to_string().contains("sequence_start=true"), "{err}");
    append(&store, 1, true, &[1.0]).await;
    let turn = store.begin(n(1), false, true, rows(&[2.0])).await.unwrap();
    turn.commit();
    assert_eq!(store.usage(), (0, 0));
    assert_unknown(&store, 1, &[3.0]).await;
    // Numbers and strings are different ids.
    append(&store, 2, true, &[1.0]).await;
    let err = store
        .begin(StreamId::Text("2".into()), false, false, rows(&[1.0]))
        .await
        .unwrap_err();
    assert!(matches!(err, StreamError::Unknown { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn the_stream_cap_evicts_the_least_recently_used() {
    let store = store_with(|c| c.max_streams = 2);
    append(&store, 1, true, &[1.0]).await;
    append(&store, 2, true, &[2.0]).await;
    append(&store, 1, false, &[1.5]).await; // 2 is now the least recently used
    append(&store, 3, true, &[3.0]).await;
    assert_eq!(store.usage(), (2, 48));
    assert_unknown(&store, 2, &[2.5]).await;
    assert_window(&store, 1, false, &[1.7], &[1.0, 1.5, 1.7]).await;
    // Restarted after its eviction, the stream holds only its new rows.
    assert_eq!(
        append(&store, 2, true, &[2.0, 2.5]).await,
        [vec![0.0; 2], rows(&[2.0, 2.5])].concat()
    );
}

#[tokio::test(start_paused = true)]
async fn the_memory_cap_counts_windows_and_ids() {
    // Two 24-byte windows fit in 60 bytes; a third with a 10-byte id
    // (34 bytes) evicts the least recently used.
    let store = store_with(|c| c.max_memory_bytes = 60);
    append(&store, 1, true, &[1.0]).await;
    append(&store, 2, true, &[2.0]).await;
    assert_eq!(store.usage(), (2, 48));
    let long_id = StreamId::Text("0123456789".into());
    apply(
        store
            .begin(long_id, true, false, rows(&[3.0]))
            .await
            .unwrap(),
    );
    assert_eq!(store.usage(), (2, 58));
    assert_unknown(&store, 1, &[1.5]).await;
}

#[tokio::test(start_paused = true)]
async fn idle_streams_are_dropped_after_the_timeout() {
    let store = store_with(|c| c.idle_timeout = Duration::from_secs(10));
    append(&store, 1, true, &[1.0]).await;
    append(&store, 2, true, &[2.0]).await;
    tokio::time::advance(Duration::from_secs(9)).await;
    append(&store, 1, false, &[1.5]).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    store.sweep();
    // 2 was idle for 10 s; 1 for 1 s.
    assert_eq!(store.usage(), (1, 24));
    assert_unknown(&store, 2, &[2.5]).await;
    tokio::time::advance(Duration::from_secs(9)).await;
    // A request finds its stream gone without waiting for the sweep.
    assert_unknown(&store, 1, &[1.7]).await;
    assert_eq!(store.usage(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn concurrent_appends_on_one_stream_apply_one_at_a_time_in_turn_order() {
    const T: usize = 64;
    let store = StreamStore::new(
        "m",
        1,
        WindowShape {
            rows: T,
            row_len: 1,
        },
        StreamConfig {
            max_pending: T,
            ..config()
        },
    );
    apply(store.begin(n(1), true, false, vec![0.0]).await.unwrap());
    // Each task records the order in which it got the turn; it holds the
    // turn across a yield, as a request holds it across the model.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (1..T)
        .map(|i| {
            let store = store.clone();
            let order = Arc::clone(&order);
            tokio::spawn(async move {
                let mut turn = store
                    .begin(n(1), false, false, vec![i as f32])
                    .await
                    .unwrap();
                order.lock().unwrap().push(i as f32);
                let input = turn.take_input();
                tokio::task::yield_now().await;
                turn.commit();
                input
            })
        })
        .collect();
    let mut inputs = Vec::new();
    for task in tasks {
        inputs.push(task.await.unwrap());
    }
    let order = order.lock().unwrap().clone();
    // Every request saw the window the previous one left: no row lost,
    // none applied twice.
    let mut expected = vec![0.0f32];
    let mut windows = Vec::new();
    for &v in &order {
        expected.push(v);
        windows.push([vec![0.0; T - expected.len()], expected.clone()].concat());
    }
    assert_eq!(order.len(), T - 1);
    // Each task's input is the window after its own row, in turn order.
    for (position, &v) in order.iter().enumerate() {
        let input = &inputs[v as usize - 1];
        assert_eq!(input, &windows[position], "request {v} (turn {position})");
    }
}

#[tokio::test(start_paused = true)]
async fn too_many_requests_waiting_on_one_stream_are_refused() {
    let store = store_with(|c| c.max_pending = 1);
    append(&store, 1, true, &[1.0]).await;
    let held = store.begin(n(1), false, false, rows(&[2.0])).await.unwrap();
    let err = refusal(&store, 1, false, &[3.0]).await;
    assert!(
        matches!(err, StreamError::Busy { pending: 1, .. }),
        "{err:?}"
    );
    held.commit();
    assert_window(&store, 1, false, &[3.0], &[1.0, 2.0, 3.0]).await;
}
