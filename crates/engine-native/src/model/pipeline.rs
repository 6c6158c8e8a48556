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
//! Both stages share the rest of the work:
//! - Before its first step the front needs the convolutions and its input
//!   projection, ~55 µs on the reference model, while the back has nothing
//!   to do. When the layers before the front's LSTM are fp32 convolutions,
//!   the front computes them for its first [`FRONT_PREFIX_SHARE`] of the
//!   rows only and starts stepping, while the helper computes the other
//!   rows (each side recomputes the few boundary rows a kernel needs).
//! - The back has more to do per row than the front (the last layer's
//!   input projection as well as its step), so it falls behind. Whenever
//!   [`FRONT_CHUNK`] published rows wait unprojected, the front projects
//!   them itself, and once its own steps are done it projects whatever is
//!   left. The projection of a row goes to whichever thread claims it
//!   first (a compare-and-swap on the claimed count), and the back runs
//!   each step as soon as its projection is ready. (Without the split
//!   above, the front had no time to spare: helping during its steps
//!   delayed its rows and made calls slower, measured.)
//!
//! The arithmetic is the single-thread path's, row for row: the packed
//! GEMM's result for a row does not depend on which other rows share the
//! call, so outputs are bit-identical to [`Plan::forward_into`] (tested).
//!
//! Nothing here waits for a thread that never comes: the back half is
//! offered to a helper (`crate::offer`), and if none has taken it by the
//! time the front is done, the caller runs it itself.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use super::{Conv1d, Ctx, Lstm, Plan, SeqLayer, fill_rows, sized};
use crate::kernels::{StepArgs, gemm_packed, lstm_step, relu_in_place};

/// Rows the back thread waits for before its first GEMM (fewer only for
/// a shorter sequence); later it takes any rows waiting. Measured at batch
/// 1 on the reference model, 2 threads, in the first version of the
/// pipeline (when this applied to every GEMM): 0.28–0.32 ms per call with
/// 2, 0.30–0.32 with 4, 0.30–0.35 with 8.
const MIN_ROWS: usize = 2;

/// The share of the front's first-layer rows (convolutions and input
/// projection) that the front computes before its first step; the helper
/// computes the rest meanwhile (see the module doc). The front reaches that
/// row after ~4 µs per row (its share of the convolutions and projection,
/// ~1.1 µs per row, and a step, ~3 µs), by when the helper's larger share
/// (~1.1 µs per row) is done: at 50 rows, 13 against 37.
const FRONT_PREFIX_SHARE: f64 = 0.25;

/// Unprojected rows that make the front project them itself instead of
/// leaving them to the back: one full row block of the AVX-512 GEMM
/// micro-kernel. Measured at batch 1 on the reference model, 2 threads,
/// median ms per call over four 2 s runs: 0.243–0.303 when the front only
/// helps after its own steps, 0.225–0.226 with 6, 0.225–0.232 with 8,
/// 0.236–0.241 with 12.
const FRONT_CHUNK: usize = 6;

/// [`HandOff::prefix`] states.
const PREFIX_PENDING: u8 = 0;
const PREFIX_CLAIMED: u8 = 1;
const PREFIX_DONE: u8 = 2;
/// The helper that claimed the rows stopped early (it panicked).
const PREFIX_FAILED: u8 = 3;

/// The buffers of a [`HandOff`], kept in the front's workspace between
/// calls.
#[derive(Debug, Default)]
pub(crate) struct HandOffBuffers {
    rows: Vec<f32>,
    gates: Vec<f32>,
    ready: Vec<AtomicBool>,
    front_gates: Vec<f32>,
}

/// `published` value that tells the reader the writer stopped early
/// (it panicked): no more rows will come.
const ABANDONED: usize = usize::MAX;

/// What the two stages share: the `[time, width]` output of the front's
/// last layer, written row by row by the front while the back reads the
/// rows already published; the `[time, 4·hidden]` input projection of the
/// back's LSTM, written by whichever thread claims each range of rows; and
/// the front LSTM's own input projection, split between the threads.
///
/// Soundness rests on three protocols:
/// - Rows: the writer writes row `t` only before it publishes `t + 1`
///   rows, and never again after; readers read only rows below the count
///   they loaded (with `Acquire`, pairing with the writer's `Release`).
/// - Projections: a range of projection rows is written only by the thread
///   whose compare-and-swap moved `claimed` over it, once, before it sets
///   the rows' `ready` flags (`Release`); it is read only after its flag
///   is seen set (`Acquire`).
/// - The front's input projection (`front_gates`): rows `0..split` are
///   the front's; rows `split..time` belong to whichever thread moved
///   `prefix` from pending to claimed, until it stores done (`Release`,
///   read with `Acquire`); after that, nobody writes them.
///
/// So no two threads ever touch the same row at the same time.
pub(crate) struct HandOff<'a> {
    rows: *mut f32,
    time: usize,
    width: usize,
    published: AtomicUsize,
    gates: *mut f32,
    gates_width: usize,
    claimed: AtomicUsize,
    ready: &'a [AtomicBool],
    front_gates: *mut f32,
    front_gates_width: usize,
    /// Rows of `front_gates` the front computes itself before its first
    /// step; `time` when the rows are not split.
    split: usize,
    prefix: AtomicU8,
    buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: the raw pointers are only dereferenced under the protocols
// above (disjoint rows, ordered by `published`, `ready` and `prefix`), and
// the buffers outlive `'a`.
unsafe impl Send for HandOff<'_> {}
// SAFETY: as above.
unsafe impl Sync for HandOff<'_> {}

impl<'a> HandOff<'a> {
    /// The hand-off of a one-row pass of `plan` cut at `cut` (see
    /// [`Plan::pipeline_cut`]), in `buffers` (grown as needed).
    pub(crate) fn new(buffers: &'a mut HandOffBuffers, plan: &Plan, cut: usize) -> Self {
        let (front, back) = plan.cut_lstms(cut);
        let time = plan.handoff_time(cut);
        let (width, front_gates_width, gates_width) =
            (front.hidden, 4 * front.hidden, 4 * back.hidden);
        let split = plan.prefix_split(cut, time);
        sized(&mut buffers.rows, time * width);
        sized(&mut buffers.gates, time * gates_width);
        sized(&mut buffers.front_gates, time * front_gates_width);
        if buffers.ready.len() < time {
            buffers.ready.resize_with(time, AtomicBool::default);
        }
        for flag in &buffers.ready[..time] {
            flag.store(false, Ordering::Relaxed);
        }
        HandOff {
            rows: buffers.rows.as_mut_ptr(),
            time,
            width,
            published: AtomicUsize::new(0),
            gates: buffers.gates.as_mut_ptr(),
            gates_width,
            claimed: AtomicUsize::new(0),
            ready: &buffers.ready[..time],
            front_gates: buffers.front_gates.as_mut_ptr(),
            front_gates_width,
            split,
            prefix: AtomicU8::new(PREFIX_PENDING),
            buffer: PhantomData,
        }
    }

    /// Rows `range` of the front's input projection, for writing.
    ///
    /// # Safety
    /// The caller owns these rows under the protocol above (rows below
    /// `split` on the front; the others after claiming `prefix`), and no
    /// other reference to them exists.
    #[allow(clippy::mut_from_ref)]
    unsafe fn front_gates_mut(&self, range: Range<usize>) -> &mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.time,
            "front rows"
        );
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.front_gates.add(range.start * self.front_gates_width),
                range.len() * self.front_gates_width,
            )
        }
    }

    /// Row `t` of the front's input projection, for reading.
    ///
    /// # Safety
    /// Row `t` is written and will not be written again: `t < split` and
    /// the front wrote it, or the prefix is done.
    unsafe fn front_gates_row(&self, t: usize) -> &[f32] {
        assert!(t < self.time, "front row");
        // SAFETY: in bounds (checked); no writer by the caller's contract.
        unsafe {
            std::slice::from_raw_parts(
                self.front_gates.add(t * self.front_gates_width),
                self.front_gates_width,
            )
        }
    }

    /// Claims the front rows `split..time` for the calling thread.
    fn claim_prefix(&self) -> bool {
        self.split < self.time
            && self
                .prefix
                .compare_exchange(
                    PREFIX_PENDING,
                    PREFIX_CLAIMED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
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

    /// Whether the writer stopped early.
    fn abandoned(&self) -> bool {
        self.published.load(Ordering::Acquire) == ABANDONED
    }

    /// Claims the next unprojected rows, `min_rows` to `max_rows` of those
    /// published, or `None` if fewer are waiting.
    fn claim(&self, min_rows: usize, max_rows: usize) -> Option<Range<usize>> {
        loop {
            let published = self.published.load(Ordering::Acquire);
            let start = self.claimed.load(Ordering::Acquire);
            if published == ABANDONED || published < start + min_rows.max(1) {
                return None;
            }
            let end = published.min(start.saturating_add(max_rows));
            if self
                .claimed
                .compare_exchange(start, end, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some(start..end);
            }
        }
    }

    /// Projects the claimed `range` of published rows through `lstm`'s
    /// input weights and marks them ready.
    fn project(&self, lstm: &Lstm, range: Range<usize>) {
        let rows = self.published_rows(range.end);
        // SAFETY: `range` was claimed by this thread (`claim`), so no other
        // thread writes or reads these projection rows until they are
        // marked ready below; they are in bounds (`claimed ≤ time`).
        let gates = unsafe {
            std::slice::from_raw_parts_mut(
                self.gates.add(range.start * self.gates_width),
                range.len() * self.gates_width,
            )
        };
        lstm.project(gates, 1, range.len(), &rows[range.start * self.width..]);
        for flag in &self.ready[range] {
            flag.store(true, Ordering::Release);
        }
    }

    /// Projection row `t`, if it is ready.
    fn ready_gates(&self, t: usize) -> Option<&[f32]> {
        if !self.ready[t].load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: a ready row is never written again; in bounds.
        Some(unsafe {
            std::slice::from_raw_parts(self.gates.add(t * self.gates_width), self.gates_width)
        })
    }
}

/// One round of waiting for the other stage, which produces a row every
/// few microseconds: spin, but give the core away once this has gone on
/// long enough that the other thread has likely been descheduled.
fn wait_a_little(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 4096 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
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

    /// The front's last LSTM and the back's LSTM of a pass cut at `cut`.
    fn cut_lstms(&self, cut: usize) -> (&Lstm, &Lstm) {
        match (&self.seq[cut - 1], &self.seq[cut]) {
            (SeqLayer::Lstm(front), SeqLayer::Lstm(back)) => (front, back),
            _ => unreachable!("pipeline_cut cuts between two LSTMs"),
        }
    }

    /// The time steps of the rows handed over at `cut`.
    fn handoff_time(&self, cut: usize) -> usize {
        self.seq[..cut]
            .iter()
            .fold(self.time_steps, |time, layer| match layer {
                SeqLayer::Conv(conv) => conv.out_time(time),
                SeqLayer::Lstm(_) => time,
            })
    }

    /// Where the front's first-layer rows are split between the two
    /// threads (see [`FRONT_PREFIX_SHARE`]): a row count below `time`, or
    /// `time` (not split) unless every layer before the front's LSTM is an
    /// fp32 convolution.
    fn prefix_split(&self, cut: usize, time: usize) -> usize {
        let fp32_convs = self.seq[..cut - 1]
            .iter()
            .all(|layer| matches!(layer, SeqLayer::Conv(c) if c.low_taps.is_empty()));
        if !fp32_convs {
            return time;
        }
        ((time as f64 * FRONT_PREFIX_SHARE).ceil() as usize).clamp(1, time)
    }

    /// Rows `rows` of the front LSTM's input projection (plus bias) into
    /// `gates`, computing only the convolution rows they need: each
    /// convolution's output rows need its input rows shifted by the
    /// padding and widened by the kernel. The arithmetic of each row is
    /// that of the whole-sequence pass (tested bit-identical).
    fn prefix_rows(
        &self,
        ctx: &mut Ctx,
        cut: usize,
        input: &[f32],
        rows: Range<usize>,
        gates: &mut [f32],
    ) {
        let (lstm, _) = self.cut_lstms(cut);
        // Each convolution with its input time steps and the input rows it
        // needs, found from the last back to the first.
        let mut convs: Vec<(&Conv1d, usize, Range<usize>)> = Vec::with_capacity(cut - 1);
        let mut time = self.time_steps;
        for layer in &self.seq[..cut - 1] {
            let SeqLayer::Conv(conv) = layer else {
                unreachable!("prefix_split only splits convolutions")
            };
            convs.push((conv, time, 0..0));
            time = conv.out_time(time);
        }
        let mut out = rows.clone();
        for (conv, time, needs) in convs.iter_mut().rev() {
            *needs = conv.input_rows(&out, *time);
            out = needs.clone();
        }
        let [mut cur, mut next] = std::mem::take(&mut ctx.act);
        for (index, (conv, time, needs)) in convs.iter().enumerate() {
            let src = if index == 0 {
                &input[needs.start * self.features..needs.end * self.features]
            } else {
                &cur[..needs.len() * conv.in_channels]
            };
            let out = convs
                .get(index + 1)
                .map_or(&rows, |(_, _, next_needs)| next_needs);
            conv.forward_rows(ctx, *time, src, needs, out, &mut next);
            std::mem::swap(&mut cur, &mut next);
        }
        let src = if convs.is_empty() {
            &input[rows.start * self.features..rows.end * self.features]
        } else {
            &cur[..rows.len() * lstm.input]
        };
        lstm.project(gates, 1, rows.len(), src);
        ctx.act = [cur, next];
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
        let (publishing, back) = self.cut_lstms(cut);
        if handoff.split < handoff.time {
            // SAFETY: rows below `split` are the front's.
            let gates = unsafe { handoff.front_gates_mut(0..handoff.split) };
            self.prefix_rows(ctx, cut, input, 0..handoff.split, gates);
        } else {
            let mut time = self.time_steps;
            let mut channels = self.features;
            let [mut cur, mut next] = std::mem::take(&mut ctx.act);
            for (index, layer) in self.seq[..cut - 1].iter().enumerate() {
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
                    SeqLayer::Lstm(lstm) => {
                        lstm.forward(ctx, 1, time, src, false, &mut next);
                        channels = lstm.hidden;
                    }
                }
                std::mem::swap(&mut cur, &mut next);
            }
            let src = if cut == 1 {
                input
            } else {
                &cur[..time * channels]
            };
            // SAFETY: not split: every row is the front's.
            let gates = unsafe { handoff.front_gates_mut(0..handoff.time) };
            publishing.project(gates, 1, time, src);
            ctx.act = [cur, next];
        }
        publishing.forward_publishing(ctx, handoff, back, |ctx| {
            self.finish_prefix(ctx, cut, input, handoff);
        });
        guard.1 = true;
    }

    /// The front rows `split..time`, on the front when it reaches them: it
    /// computes them itself unless the helper claimed them, and then waits
    /// for the helper (or, if it failed, computes them after all).
    fn finish_prefix(&self, ctx: &mut Ctx, cut: usize, input: &[f32], handoff: &HandOff<'_>) {
        let mut spins = 0u32;
        loop {
            if handoff.claim_prefix() {
                self.compute_prefix_rest(ctx, cut, input, handoff);
                return;
            }
            match handoff.prefix.load(Ordering::Acquire) {
                PREFIX_DONE => return,
                PREFIX_FAILED => {
                    // The helper unwound and touches nothing any more.
                    handoff.prefix.store(PREFIX_CLAIMED, Ordering::Relaxed);
                    self.compute_prefix_rest(ctx, cut, input, handoff);
                    return;
                }
                _ => {}
            }
            wait_a_little(&mut spins);
        }
    }

    /// Computes the front rows `split..time` after claiming them, and
    /// marks them done (or failed, should this panic).
    fn compute_prefix_rest(&self, ctx: &mut Ctx, cut: usize, input: &[f32], handoff: &HandOff<'_>) {
        struct FailOnUnwind<'h, 'a>(&'h HandOff<'a>);
        impl Drop for FailOnUnwind<'_, '_> {
            fn drop(&mut self) {
                self.0.prefix.store(PREFIX_FAILED, Ordering::Release);
            }
        }
        let fail = FailOnUnwind(handoff);
        let rows = handoff.split..handoff.time;
        // SAFETY: this thread claimed these rows (`claim_prefix`).
        let gates = unsafe { handoff.front_gates_mut(rows.clone()) };
        self.prefix_rows(ctx, cut, input, rows, gates);
        std::mem::forget(fail);
        handoff.prefix.store(PREFIX_DONE, Ordering::Release);
    }

    /// The back of a one-row pass: first the front rows past the split, if
    /// the front has not claimed them; then the last LSTM over the rows
    /// `handoff` publishes, then the head, into `out`. Returns `false` (and
    /// leaves `out` alone) if the front stopped early.
    pub(crate) fn forward_back(
        &self,
        ctx: &mut Ctx,
        cut: usize,
        input: &[f32],
        handoff: &HandOff<'_>,
        out: &mut [f32],
    ) -> bool {
        if handoff.claim_prefix() {
            self.compute_prefix_rest(ctx, cut, input, handoff);
        }
        let (_, lstm) = self.cut_lstms(cut);
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

impl Conv1d {
    /// The input rows (of `time`) that output rows `out` read: shifted by
    /// the padding, widened by the kernel, clipped to the sequence.
    fn input_rows(&self, out: &Range<usize>, time: usize) -> Range<usize> {
        let start = out.start.saturating_sub(self.pad_begin).min(time);
        let end = (out.end + self.kernel - 1)
            .saturating_sub(self.pad_begin)
            .min(time);
        start..end.max(start)
    }

    /// Output rows `out` of one row's pass over `time` input steps, from
    /// input rows `have` (`src`, `[have.len(), C_in]`, covering
    /// [`Conv1d::input_rows`]), into `dst` (`[out.len(), C_out]`). Each
    /// row's arithmetic is [`Conv1d::forward`]'s: bias, then the taps in
    /// order over the zero-padded input.
    fn forward_rows(
        &self,
        ctx: &mut Ctx,
        time: usize,
        src: &[f32],
        have: &Range<usize>,
        out: &Range<usize>,
        dst: &mut Vec<f32>,
    ) {
        let (cin, cout, k) = (self.in_channels, self.out_channels, self.kernel);
        let span = out.len() + k - 1;
        let padded = sized(&mut ctx.padded, span * cin);
        for (p, row) in padded.chunks_exact_mut(cin).enumerate() {
            // Padded row `out.start + p` holds input row `… − pad_begin`.
            match (out.start + p).checked_sub(self.pad_begin) {
                Some(r) if r < time => {
                    debug_assert!(have.contains(&r), "conv input row {r} not in {have:?}");
                    let offset = (r - have.start) * cin;
                    row.copy_from_slice(&src[offset..offset + cin]);
                }
                _ => row.fill(0.0),
            }
        }
        let full = sized(&mut ctx.full, out.len() * cout);
        fill_rows(full, &self.bias);
        for (tap, w) in self.packed_taps.iter().enumerate() {
            gemm_packed(w, out.len(), full, cout, &ctx.padded[tap * cin..], cin);
        }
        let dst = sized(dst, out.len() * cout);
        dst.copy_from_slice(&ctx.full[..out.len() * cout]);
        if self.relu {
            relu_in_place(dst);
        }
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

    /// [`Lstm::forward`] for one row over the input projection in
    /// `handoff`, with every step's hidden state written to `handoff` (row
    /// `t`) and published as soon as it exists. Before the first row past
    /// the split it calls `finish_prefix`. It projects rows through
    /// `back`'s input weights whenever [`FRONT_CHUNK`] of them wait
    /// unclaimed, and after its last step all that are left.
    fn forward_publishing(
        &self,
        ctx: &mut Ctx,
        handoff: &HandOff<'_>,
        back: &Lstm,
        finish_prefix: impl FnOnce(&mut Ctx),
    ) {
        let hidden = self.hidden;
        sized(&mut ctx.c, hidden).fill(0.0);
        let step = |ctx: &mut Ctx, t: usize| {
            // SAFETY: rows below `split` are the front's own, written
            // before this; the others are done (`finish_prefix` returned).
            let gates = unsafe { handoff.front_gates_row(t) };
            let h_prev: &[f32] = if t == 0 {
                &[]
            } else {
                &handoff.published_rows(t)[(t - 1) * hidden..]
            };
            // SAFETY: row `t` is not published yet and this is the only
            // writer.
            let h_next = unsafe { handoff.row_mut(t) };
            self.one_row_step(t, gates, h_prev, &mut ctx.c[..hidden], h_next);
            handoff.publish(t + 1);
        };
        for t in 0..handoff.split {
            step(ctx, t);
        }
        if handoff.split < handoff.time {
            finish_prefix(ctx);
        }
        for t in handoff.split..handoff.time {
            step(ctx, t);
            // Only past the split: before it, the helper is still on the
            // rows past it, the back has not started, and the front has no
            // time to spare.
            if let Some(range) = handoff.claim(FRONT_CHUNK, FRONT_CHUNK) {
                handoff.project(back, range);
            }
        }
        while let Some(range) = handoff.claim(1, usize::MAX) {
            handoff.project(back, range);
        }
    }

    /// [`Lstm::forward`] for one row whose input rows arrive through
    /// `handoff`: each step runs once its projection is ready; when the
    /// next one is not, the back thread projects every row published and
    /// unclaimed since (one GEMM). Leaves the final hidden state in
    /// `ctx.h[0]`; `false` if the front stopped early.
    fn forward_consuming(&self, ctx: &mut Ctx, handoff: &HandOff<'_>) -> bool {
        let hidden = self.hidden;
        let time = handoff.time;
        let [mut h_prev, mut h_next] = std::mem::take(&mut ctx.h);
        sized(&mut h_prev, hidden);
        sized(&mut h_next, hidden);
        let c = sized(&mut ctx.c, hidden);
        c.fill(0.0);
        let mut complete = true;
        let mut spins = 0u32;
        let mut step = 0;
        while step < time {
            if let Some(gates) = handoff.ready_gates(step) {
                self.one_row_step(step, gates, &h_prev, c, &mut h_next);
                std::mem::swap(&mut h_prev, &mut h_next);
                step += 1;
                spins = 0;
                continue;
            }
            // Wait for MIN_ROWS rows at first, so the first GEMM is not a
            // one-row product; later, any row is worth taking.
            let min_rows = if step == 0 { MIN_ROWS.min(time) } else { 1 };
            if let Some(range) = handoff.claim(min_rows, usize::MAX) {
                handoff.project(self, range);
                continue;
            }
            if handoff.abandoned() {
                complete = false;
                break;
            }
            wait_a_little(&mut spins);
        }
        ctx.h = [h_prev, h_next];
        complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::available_simd;

    /// A convolution with uneven padding and a wide kernel, so that rows
    /// near both ends read padding.
    fn conv(simd: crate::kernels::Simd) -> Conv1d {
        let (kernel, cin, cout) = (5, 7, 19);
        let taps: Vec<f32> = (0..kernel * cin * cout)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        Conv1d {
            in_channels: cin,
            out_channels: cout,
            kernel,
            pad_begin: 3,
            pad_end: 1,
            packed_taps: Conv1d::pack_taps(&taps, kernel, cin, cout, simd),
            taps,
            bias: (0..cout).map(|i| i as f32 * 0.1 - 0.5).collect(),
            relu: true,
            low_taps: Vec::new(),
        }
    }

    #[test]
    fn any_rows_of_a_convolution_equal_the_whole_pass_bit_for_bit() {
        let time = 23;
        for simd in available_simd() {
            let conv = conv(simd);
            let input: Vec<f32> = (0..time * conv.in_channels)
                .map(|i| ((i as f32) * 0.11).cos())
                .collect();
            let mut ctx = Ctx::new();
            let mut whole = Vec::new();
            let out_time = conv.forward(&mut ctx, 1, time, &input, &mut whole);
            for out in [
                0..1,
                0..6,
                3..17,
                17..out_time,
                out_time - 1..out_time,
                0..out_time,
            ] {
                let have = conv.input_rows(&out, time);
                let src = &input[have.start * conv.in_channels..have.end * conv.in_channels];
                let mut rows = Vec::new();
                conv.forward_rows(&mut ctx, time, src, &have, &out, &mut rows);
                let cout = conv.out_channels;
                let expected = &whole[out.start * cout..out.end * cout];
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&rows[..out.len() * cout]),
                    bits(expected),
                    "{simd:?} rows {out:?}"
                );
            }
        }
    }
}
