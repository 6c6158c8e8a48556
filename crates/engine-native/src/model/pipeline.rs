//! One row on two threads: the last LSTM layer (and the head) runs on a
//! second thread while the layers before it are still computing, one
//! time step behind them.
//!
//! At one row, splitting the batch gives nothing to split, and each LSTM
//! step is bound by streaming its recurrent weights from L2 (see
//! docs/engines.md). Two cores have two L2s, so two layers' recurrences
//! can stream at once. The front thread (the caller) runs the sequence
//! layers up to the last LSTM and publishes each step's hidden state into
//! a [`HandOff`]; the back thread projects the rows published so far
//! through the last LSTM's input weights in one GEMM, runs their steps,
//! and waits only when it has caught up. Threads meet per batch of
//! published rows, not per step, so a late wake-up costs a few steps'
//! time, not every step's.
//!
//! The arithmetic is the single-thread path's, row for row: the packed
//! GEMM's result for a row does not depend on which other rows share the
//! call, so outputs are bit-identical to [`Plan::forward_into`] (tested).
//!
//! Nothing here waits for a thread that never comes: the back half is
//! offered to a helper (`crate::offer`), and if none has taken it by the
//! time the front is done, the caller runs it itself.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Ctx, Lstm, Plan, SeqLayer, sized};
use crate::kernels::{StepArgs, lstm_step};

/// Rows the back thread waits for before it starts a GEMM (fewer only at
/// the end of the sequence). Its first wait is this many of the front's
/// steps; later it is behind and finds more. Measured at batch 1 on the
/// reference model, 2 threads: 0.28–0.32 ms per call with 2, 0.30–0.32
/// with 4, 0.30–0.35 with 8.
const MIN_ROWS: usize = 2;

/// `published` value that tells the reader the writer stopped early
/// (it panicked): no more rows will come.
const ABANDONED: usize = usize::MAX;

/// The `[time, width]` output of one layer, written row by row by one
/// thread while another reads the rows already published.
///
/// Soundness rests on one protocol: the writer writes row `t` only before
/// it publishes `t + 1` rows, and never again after; the reader reads only
/// rows below the count it loaded (with `Acquire`, pairing with the
/// writer's `Release`). The two therefore never touch the same row at the
/// same time.
pub(crate) struct HandOff<'a> {
    rows: *mut f32,
    time: usize,
    width: usize,
    published: AtomicUsize,
    buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: the raw pointer is only dereferenced under the protocol above
// (disjoint rows, ordered by `published`), and the buffer outlives `'a`.
unsafe impl Send for HandOff<'_> {}
// SAFETY: as above.
unsafe impl Sync for HandOff<'_> {}

impl<'a> HandOff<'a> {
    /// Hands over `buffer`'s first `time × width` values.
    ///
    /// # Panics
    /// If `buffer` is shorter.
    pub(crate) fn new(buffer: &'a mut [f32], time: usize, width: usize) -> Self {
        assert!(buffer.len() >= time * width, "hand-off buffer");
        HandOff {
            rows: buffer.as_mut_ptr(),
            time,
            width,
            published: AtomicUsize::new(0),
            buffer: PhantomData,
        }
    }

    /// Row `t` for writing. Only the writer calls this, for the row it is
    /// about to publish.
    ///
    /// # Safety
    /// `t` has not been published, and no other `&mut` to row `t` exists.
    // A `&mut` from `&self` is this type's purpose: the two threads share
    // the hand-off, and the protocol above gives the writer sole access to
    // each row until it publishes it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_mut(&self, t: usize) -> &mut [f32] {
        assert!(t < self.time, "hand-off row");
        // SAFETY: in bounds (checked); unpublished rows are the writer's
        // alone (the caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.rows.add(t * self.width), self.width) }
    }

    /// Rows `0..t` after the writer published them (`t ≤` published).
    fn published_rows(&self, t: usize) -> &[f32] {
        debug_assert!(t <= self.published.load(Ordering::Acquire));
        // SAFETY: published rows are never written again, and `t·width`
        // values are in bounds.
        unsafe { std::slice::from_raw_parts(self.rows, t * self.width) }
    }

    /// Makes rows `0..count` visible to the reader.
    fn publish(&self, count: usize) {
        self.published.store(count, Ordering::Release);
    }

    /// Tells the reader no more rows will come.
    fn abandon(&self) {
        self.published.store(ABANDONED, Ordering::Release);
    }

    /// Waits until at least `min(at_least, time)` rows are published and
    /// returns how many are, or `None` if the writer stopped early.
    fn wait_for(&self, at_least: usize) -> Option<usize> {
        let target = at_least.min(self.time);
        let mut spins = 0u32;
        loop {
            match self.published.load(Ordering::Acquire) {
                ABANDONED => return None,
                n if n >= target => return Some(n),
                _ => {}
            }
            // The writer produces a row every few microseconds: spin, but
            // give the core away if it has been descheduled.
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Marks the hand-off abandoned unless the front finished: a panicking
/// front must not leave the back thread waiting forever.
struct AbandonOnUnwind<'h, 'a>(&'h HandOff<'a>, bool);

impl Drop for AbandonOnUnwind<'_, '_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandon();
        }
    }
}

impl Plan {
    /// Where a one-row pass can be cut between two threads: the index of
    /// the last sequence layer, when it and the layer before it are fp32
    /// LSTMs (the front then ends in an LSTM that publishes step by step)
    /// and no QDQ rounding applies to the sequence. `None` for other plans,
    /// which run on one thread at one row.
    pub(crate) fn pipeline_cut(&self) -> Option<usize> {
        let last = self.seq.len().checked_sub(1)?;
        let fp32_lstm = |layer: &SeqLayer| match layer {
            SeqLayer::Lstm(l) => l.w_low.is_none() && l.r_low.is_none(),
            SeqLayer::Conv(_) => false,
        };
        let before = self.seq.get(last.checked_sub(1)?)?;
        (fp32_lstm(&self.seq[last]) && fp32_lstm(before) && self.output_quant.is_empty())
            .then_some(last)
    }

    /// The time steps and width of the rows handed over at `cut`.
    pub(crate) fn handoff_shape(&self, cut: usize) -> (usize, usize) {
        let mut time = self.time_steps;
        for layer in &self.seq[..cut] {
            if let SeqLayer::Conv(conv) = layer {
                time = conv.out_time(time);
            }
        }
        let width = match &self.seq[cut - 1] {
            SeqLayer::Lstm(l) => l.hidden,
            SeqLayer::Conv(c) => c.out_channels,
        };
        (time, width)
    }

    /// The front of a one-row pass: sequence layers `0..cut`, the last of
    /// which (an LSTM, see [`Plan::pipeline_cut`]) publishes each step's
    /// hidden state to `handoff`.
    pub(crate) fn forward_front(
        &self,
        ctx: &mut Ctx,
        cut: usize,
        input: &[f32],
        handoff: &HandOff<'_>,
    ) {
        let mut guard = AbandonOnUnwind(handoff, false);
        let mut time = self.time_steps;
        let mut channels = self.features;
        let [mut cur, mut next] = std::mem::take(&mut ctx.act);
        for (index, layer) in self.seq[..cut].iter().enumerate() {
            let src = if index == 0 {
                input
            } else {
                &cur[..time * channels]
            };
            match layer {
                SeqLayer::Conv(conv) => {
                    time = conv.forward(ctx, 1, time, src, &mut next);
                    channels = conv.out_channels;
                }
                SeqLayer::Lstm(lstm) if index + 1 == cut => {
                    lstm.forward_publishing(ctx, time, src, handoff);
                }
                SeqLayer::Lstm(lstm) => {
                    lstm.forward(ctx, 1, time, src, false, &mut next);
                    channels = lstm.hidden;
                }
            }
            std::mem::swap(&mut cur, &mut next);
        }
        ctx.act = [cur, next];
        guard.1 = true;
    }

    /// The back of a one-row pass: the last LSTM over the rows `handoff`
    /// publishes, then the head, into `out`. Returns `false` (and leaves
    /// `out` alone) if the front stopped early.
    pub(crate) fn forward_back(
        &self,
        ctx: &mut Ctx,
        cut: usize,
        handoff: &HandOff<'_>,
        out: &mut [f32],
    ) -> bool {
        let SeqLayer::Lstm(lstm) = &self.seq[cut] else {
            unreachable!("pipeline_cut only cuts before an LSTM")
        };
        if !lstm.forward_consuming(ctx, handoff) {
            return false;
        }
        // The final hidden state is in `ctx.h[0]`; the head does not touch
        // `ctx.h`.
        let h = std::mem::take(&mut ctx.h);
        self.forward_head(ctx, 1, lstm.hidden, &h[0][..lstm.hidden], out);
        ctx.h = h;
        true
    }
}

impl Lstm {
    /// Step `t` of one row: `gates` starts with the step's input projection
    /// plus bias; `h_prev` is unread at `t = 0` (zero initial state).
    fn one_row_step(
        &self,
        t: usize,
        gates: &[f32],
        h_prev: &[f32],
        c: &mut [f32],
        h_next: &mut [f32],
    ) {
        lstm_step(
            &self.r_packed,
            StepArgs {
                rows: 1,
                x: &[],
                x_rs: 0,
                recurrent: t > 0,
                h_prev,
                hp_rs: self.hidden,
                gates,
                g_rs: 4 * self.hidden,
                c,
                h_next,
                hn_rs: self.hidden,
            },
        );
    }

    /// [`Lstm::forward`] for one row, with every step's hidden state
    /// written to `handoff` (row `t`) and published as soon as it exists.
    fn forward_publishing(&self, ctx: &mut Ctx, time: usize, input: &[f32], handoff: &HandOff<'_>) {
        let hidden = self.hidden;
        let gates_width = 4 * hidden;
        self.project(sized(&mut ctx.gates, time * gates_width), 1, time, input);
        let c = sized(&mut ctx.c, hidden);
        c.fill(0.0);
        let gates = &ctx.gates[..time * gates_width];
        for t in 0..time {
            let h_prev: &[f32] = if t == 0 {
                &[]
            } else {
                &handoff.published_rows(t)[(t - 1) * hidden..]
            };
            // SAFETY: row `t` is not published yet and this is the only
            // writer.
            let h_next = unsafe { handoff.row_mut(t) };
            self.one_row_step(t, &gates[t * gates_width..], h_prev, c, h_next);
            handoff.publish(t + 1);
        }
    }

    /// [`Lstm::forward`] for one row whose input rows arrive through
    /// `handoff`: each time the back thread catches up it projects every
    /// row published since (one GEMM) and runs their steps. Leaves the
    /// final hidden state in `ctx.h[0]`; `false` if the front stopped
    /// early.
    fn forward_consuming(&self, ctx: &mut Ctx, handoff: &HandOff<'_>) -> bool {
        let hidden = self.hidden;
        let gates_width = 4 * hidden;
        let time = handoff.time;
        sized(&mut ctx.gates, time * gates_width);
        let [mut h_prev, mut h_next] = std::mem::take(&mut ctx.h);
        sized(&mut h_prev, hidden);
        sized(&mut h_next, hidden);
        let c = sized(&mut ctx.c, hidden);
        c.fill(0.0);
        let mut t = 0;
        let mut complete = true;
        while t < time {
            let Some(available) = handoff.wait_for(t + MIN_ROWS) else {
                complete = false;
                break;
            };
            let end = available.min(time);
            let rows = handoff.published_rows(end);
            let gates = &mut ctx.gates[t * gates_width..end * gates_width];
            self.project(gates, 1, end - t, &rows[t * self.input..]);
            for step in t..end {
                let gates = &ctx.gates[step * gates_width..];
                self.one_row_step(step, gates, &h_prev, c, &mut h_next);
                std::mem::swap(&mut h_prev, &mut h_next);
            }
            t = end;
        }
        ctx.h = [h_prev, h_next];
        complete
    }
}
