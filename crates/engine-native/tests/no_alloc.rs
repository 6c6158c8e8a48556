//! A steady-state forward pass allocates nothing: the engine's pooled
//! workspaces are reused call after call. A counting global allocator
//! counts allocations made by this test's thread only, and only between
//! the two marks around the call, so the test harness's own allocations
//! (other threads, output capture) cannot reach the count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use tickserve_engine_native::NativeEngine;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: every method forwards to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals, which do not
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations this thread makes while running `f`.
fn allocations_in(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    COUNT.with(Cell::get)
}

#[test]
fn the_counter_sees_an_allocation() {
    // Without this, a counter that never counts would pass the test below.
    let n = allocations_in(|| {
        std::hint::black_box(vec![1u8; 100]);
    });
    assert_eq!(n, 1);
}

#[test]
fn a_steady_state_forward_pass_allocates_nothing() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/cnn_lstm/1/model.onnx");
    let engine = NativeEngine::load(&model).unwrap();
    for rows in [1usize, 7, 32] {
        let input = tickserve_test_support::sine_input(rows * 3000);
        let mut output = vec![0.0f32; rows * 3];
        // The first call at a size grows the workspace.
        engine.infer_into(rows, &input, &mut output).unwrap();
        let first = output.clone();
        let n = allocations_in(|| engine.infer_into(rows, &input, &mut output).unwrap());
        assert_eq!(n, 0, "batch {rows}: {n} allocations in a steady-state call");
        assert_eq!(
            output, first,
            "batch {rows}: the reused workspace changed the result"
        );
    }
    // A smaller batch after a larger one reuses the larger buffers.
    let input: Vec<f32> = (0..2 * 3000).map(|i| ((i as f32) * 0.02).cos()).collect();
    let mut output = vec![0.0f32; 2 * 3];
    let n = allocations_in(|| engine.infer_into(2, &input, &mut output).unwrap());
    assert_eq!(n, 0, "batch 2 after batch 32: {n} allocations");
}
