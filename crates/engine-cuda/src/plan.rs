//! Host-side planning, independent of CUDA so it is unit-tested on any
//! machine: the device buffers one worker needs per batch row, how many
//! rows fit in the GPU's memory, and the batch sizes a CUDA graph is
//! captured for.

use tickserve_engine_native::{ModelWeights, SeqWeights};

/// Largest LSTM hidden size the fused step kernel's shared memory holds.
pub const MAX_HIDDEN: usize = 1024;

/// Fraction of the GPU's memory the engine may allocate unless configured.
pub const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.85;

/// Free memory kept back when sizing the batch (the design document's 20 %).
pub const FREE_MEMORY_MARGIN: f64 = 0.20;

/// cuBLAS workspace per worker (set explicitly so graph capture never
/// allocates).
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Device buffers of one worker, in `f32` elements per batch row (the
/// bf16 scratch in 16-bit elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPlan {
    pub input: usize,
    /// Each of the two ping-pong activation buffers (`[T, C]`, largest layer).
    pub act: usize,
    /// im2col rows of the largest convolution.
    pub col: usize,
    /// LSTM input projection `[T, 4H]`, largest layer.
    pub gates: usize,
    /// Each of the hidden-state ping-pong buffers and the cell state.
    pub state: usize,
    /// Each of the two head buffers (and the last-step vector).
    pub head: usize,
    /// bf16 copy of the largest GEMM left-hand side.
    pub low: usize,
    pub output: usize,
}

impl BufferPlan {
    pub fn new(model: &ModelWeights) -> Self {
        let mut time = model.time_steps;
        let mut channels = model.features;
        let (mut act, mut col, mut gates, mut state, mut low) = (0, 0, 0, 0, 0);
        for layer in &model.seq {
            match layer {
                SeqWeights::Conv(conv) => {
                    let out_time = conv.out_time(time);
                    col = col.max(out_time * conv.kernel * conv.in_channels);
                    low = low.max(out_time * conv.kernel * conv.in_channels);
                    time = out_time;
                    channels = conv.out_channels;
                }
                SeqWeights::Lstm(lstm) => {
                    gates = gates.max(time * 4 * lstm.hidden);
                    state = state.max(lstm.hidden);
                    // The projection's bf16 input, then each step's bf16 h.
                    low = low.max(time * lstm.input).max(lstm.hidden);
                    channels = lstm.hidden;
                }
            }
            act = act.max(time * channels);
        }
        let mut head = channels;
        for linear in &model.head {
            head = head.max(linear.output);
            low = low.max(linear.input);
        }
        BufferPlan {
            input: model.time_steps * model.features,
            act,
            col,
            gates,
            state,
            head,
            low,
            output: model.output_width,
        }
    }

    /// Device bytes one batch row costs a worker, every buffer included.
    pub fn bytes_per_row(&self) -> usize {
        4 * (self.input
            + 2 * self.act
            + self.col
            + self.gates
            + 3 * self.state
            + 2 * self.head
            + self.output)
            + 2 * self.low
    }

    /// Byte offsets of every buffer in a worker's arena for `rows` rows,
    /// each aligned to 256 bytes, and the arena's size.
    pub fn layout(&self, rows: usize) -> Layout {
        let mut at = 0usize;
        let mut take = |elements: usize, bytes_each: usize| {
            let offset = at;
            at += (elements * rows * bytes_each).div_ceil(256) * 256;
            offset
        };
        let input = take(self.input, 4);
        let act = [take(self.act, 4), take(self.act, 4)];
        let col = take(self.col, 4);
        let gates = take(self.gates, 4);
        let h = [take(self.state, 4), take(self.state, 4)];
        let c = take(self.state, 4);
        let head = [take(self.head, 4), take(self.head, 4)];
        let low = take(self.low, 2);
        let output = take(self.output, 4);
        Layout {
            input,
            act,
            col,
            gates,
            h,
            c,
            head,
            low,
            output,
            bytes: at,
        }
    }
}

/// Byte offsets of a worker's buffers in its arena (see [`BufferPlan::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub input: usize,
    pub act: [usize; 2],
    pub col: usize,
    pub gates: usize,
    pub h: [usize; 2],
    pub c: usize,
    pub head: [usize; 2],
    pub low: usize,
    pub output: usize,
    pub bytes: usize,
}

/// Why a model cannot run on the CUDA engine at all.
pub fn check_supported(model: &ModelWeights) -> Result<(), String> {
    for layer in &model.seq {
        if let SeqWeights::Lstm(lstm) = layer
            && lstm.hidden > MAX_HIDDEN
        {
            return Err(format!(
                "LSTM hidden size {} is above the CUDA engine's {MAX_HIDDEN}",
                lstm.hidden
            ));
        }
    }
    Ok(())
}

/// The GPU memory the engine may use and what it needs, for [`batch_cap`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    pub free_bytes: usize,
    pub total_bytes: usize,
    /// `gpu_memory_fraction`: the engine's allocations stay under this
    /// fraction of the total.
    pub fraction: f64,
    /// Bytes allocated once (weights), whatever the batch size.
    pub fixed_bytes: usize,
    /// Bytes each worker allocates besides its batch buffers.
    pub per_worker_bytes: usize,
    pub workers: usize,
}

/// The largest batch (at most `requested`) whose buffers, for every
/// worker, fit both in `fraction` of the GPU's memory and in its free
/// memory less a 20 % margin. `Err` when not even one row fits.
pub fn batch_cap(
    budget: &MemoryBudget,
    bytes_per_row: usize,
    requested: usize,
) -> Result<usize, String> {
    if !(budget.fraction > 0.0 && budget.fraction <= 1.0) {
        return Err(format!(
            "gpu_memory_fraction must be in (0, 1], got {}",
            budget.fraction
        ));
    }
    let by_fraction = (budget.total_bytes as f64 * budget.fraction) as usize;
    let by_free = (budget.free_bytes as f64 * (1.0 - FREE_MEMORY_MARGIN)) as usize;
    let workers = budget.workers.max(1);
    let usable = by_fraction
        .min(by_free)
        .saturating_sub(budget.fixed_bytes + workers * budget.per_worker_bytes);
    let rows = usable / (bytes_per_row.max(1) * workers);
    if rows == 0 {
        return Err(format!(
            "not one batch row fits in GPU memory: {} MiB free of {} MiB, fraction {}, \
             {} MiB fixed, {} bytes per row for each of {workers} workers",
            budget.free_bytes >> 20,
            budget.total_bytes >> 20,
            budget.fraction,
            (budget.fixed_bytes + workers * budget.per_worker_bytes) >> 20,
            bytes_per_row
        ));
    }
    Ok(rows.min(requested.max(1)))
}

/// Batch sizes a CUDA graph is captured for: powers of two below
/// `max_batch`, and `max_batch` itself.
pub fn graph_buckets(max_batch: usize) -> Vec<usize> {
    let mut buckets: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b < max_batch)
        .collect();
    buckets.push(max_batch.max(1));
    buckets
}

/// The smallest bucket holding `rows` rows (rows beyond the batch are
/// padding: rows are independent, their outputs are dropped).
pub fn bucket_for(buckets: &[usize], rows: usize) -> Option<usize> {
    buckets.iter().copied().find(|&b| b >= rows)
}

/// How one LSTM layer runs as a cluster kernel (kernels_cluster.cu): the
/// kernel's name, and its launch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterShape {
    /// Blocks per cluster; each keeps `hidden / cluster` units' recurrent
    /// weights in shared memory.
    pub cluster: usize,
    /// Rows each cluster runs (the kernel's `ROWS`: one of
    /// [`CLUSTER_ROWS`]).
    pub rows_per_cluster: usize,
    /// Threads per block: the block's `4·hidden/cluster` gate columns
    /// times the slices the reduction over `k` is split into.
    pub threads: usize,
    /// Clusters in the grid (`ceil(rows / rows_per_cluster)`).
    pub groups: usize,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: usize,
}

/// Cluster sizes compiled into kernels_cluster.cu, tried in this order
/// (fewer blocks first: fewer remote stores and a cheaper barrier).
pub const CLUSTER_SIZES: [usize; 2] = [4, 8];

/// Rows per cluster compiled into kernels_cluster.cu: one row alone (the
/// latency case), else eight.
pub const CLUSTER_ROWS: [usize; 2] = [1, 8];

/// The cluster kernel's shape for `rows` rows of hidden size `hidden`,
/// with recurrent weights of `weight_bytes` bytes each (4 fp32, 2 bf16),
/// when one of [`CLUSTER_SIZES`] keeps a block's slice of the weights
/// within `max_shared` bytes of shared memory; `None` otherwise (the
/// per-step kernels run the layer).
pub fn cluster_shape(
    rows: usize,
    hidden: usize,
    weight_bytes: usize,
    max_shared: usize,
) -> Option<ClusterShape> {
    if rows == 0 || hidden == 0 {
        return None;
    }
    let rows_per_cluster = if rows == 1 { 1 } else { 8 };
    CLUSTER_SIZES.into_iter().find_map(|cluster| {
        if !hidden.is_multiple_of(cluster) {
            return None;
        }
        let units = hidden / cluster;
        let columns = 4 * units;
        // One row: short reduction chains (latency); eight rows: fewer,
        // longer ones (registers, and fewer partial sums to add).
        let (most_threads, most_slices) = if rows_per_cluster == 1 {
            (1024, 8)
        } else {
            (512, 4)
        };
        let slices = (most_threads / columns).min(most_slices).min(hidden);
        // At least two slices: the cell threads (rows × units) must exist.
        if slices < 2 {
            return None;
        }
        let weights = (hidden * columns * weight_bytes).div_ceil(16) * 16;
        let shared_bytes = weights
            + 4 * (2 * rows_per_cluster * hidden)
            + 4 * (slices * rows_per_cluster * columns);
        (shared_bytes <= max_shared).then_some(ClusterShape {
            cluster,
            rows_per_cluster,
            threads: columns * slices,
            groups: rows.div_ceil(rows_per_cluster),
            shared_bytes,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickserve_engine_native::{ConvWeights, LinearWeights, LstmWeights};

    /// The reference model's shapes (no weights needed for planning).
    fn reference() -> ModelWeights {
        let conv = |cin: usize, cout: usize| {
            SeqWeights::Conv(ConvWeights {
                in_channels: cin,
                out_channels: cout,
                kernel: 3,
                pad_begin: 1,
                pad_end: 1,
                taps: vec![],
                bias: vec![],
                relu: true,
            })
        };
        let lstm = |input: usize| {
            SeqWeights::Lstm(LstmWeights {
                input,
                hidden: 128,
                w_t: vec![],
                r_t: vec![],
                bias: vec![],
            })
        };
        let linear = |input, output, relu| LinearWeights {
            input,
            output,
            w_t: vec![],
            bias: vec![],
            relu,
        };
        ModelWeights {
            time_steps: 50,
            features: 60,
            seq: vec![conv(60, 64), conv(64, 64), lstm(64), lstm(128)],
            head: vec![linear(128, 64, true), linear(64, 3, false)],
            output_width: 3,
        }
    }

    #[test]
    fn buffers_cover_the_largest_layer_of_each_kind() {
        let plan = BufferPlan::new(&reference());
        assert_eq!(plan.input, 3000);
        assert_eq!(plan.act, 50 * 128);
        assert_eq!(plan.col, 50 * 3 * 64);
        assert_eq!(plan.gates, 50 * 512);
        assert_eq!(plan.state, 128);
        assert_eq!(plan.head, 128);
        assert_eq!(plan.low, 50 * 3 * 64);
        assert_eq!(plan.output, 3);
        // ~220 KB per row: 1024 rows are ~220 MiB per worker.
        assert_eq!(plan.bytes_per_row(), 225_772);
    }

    #[test]
    fn a_convolution_without_padding_shortens_time() {
        let mut model = reference();
        if let SeqWeights::Conv(conv) = &mut model.seq[0] {
            (conv.pad_begin, conv.pad_end) = (0, 0);
        }
        assert_eq!(model.seq_time_steps(), 48);
        let plan = BufferPlan::new(&model);
        assert_eq!(plan.col, 48 * 3 * 64, "the second conv: 48 steps of 3 taps");
        assert_eq!(plan.gates, 48 * 512);
    }

    #[test]
    fn layout_aligns_every_buffer_and_fits_them_all() {
        let plan = BufferPlan::new(&reference());
        for rows in [1, 3, 32, 1000] {
            let l = plan.layout(rows);
            let offsets = [
                l.input, l.act[0], l.act[1], l.col, l.gates, l.h[0], l.h[1], l.c, l.head[0],
                l.head[1], l.low, l.output,
            ];
            assert!(offsets.iter().all(|o| o % 256 == 0));
            assert!(offsets.windows(2).all(|w| w[0] < w[1]));
            assert!(l.output + 4 * plan.output * rows <= l.bytes);
            assert!(l.bytes >= rows * plan.bytes_per_row());
            assert!(l.bytes <= rows * plan.bytes_per_row() + 12 * 256);
        }
    }

    fn budget(free_gib: usize, total_gib: usize, fraction: f64) -> MemoryBudget {
        MemoryBudget {
            free_bytes: free_gib << 30,
            total_bytes: total_gib << 30,
            fraction,
            fixed_bytes: 1 << 20,
            per_worker_bytes: CUBLAS_WORKSPACE_BYTES,
            workers: 1,
        }
    }

    #[test]
    fn batch_cap_keeps_a_fifth_of_free_memory() {
        // 1 GiB free of 80: 0.8 GiB usable, less 33 MiB fixed.
        let per_row = 1 << 20;
        let cap = batch_cap(&budget(1, 80, 0.85), per_row, 100_000).unwrap();
        assert_eq!(cap, ((1usize << 30) * 4 / 5 - (33 << 20)) / per_row);
    }

    #[test]
    fn batch_cap_keeps_under_the_memory_fraction() {
        // All 80 GiB free, fraction 0.1: 8 GiB, not 64.
        let per_row = 1 << 20;
        let cap = batch_cap(&budget(80, 80, 0.1), per_row, 1_000_000).unwrap();
        assert_eq!(cap, ((80usize << 30) / 10 - (33 << 20)) / per_row);
    }

    #[test]
    fn batch_cap_never_exceeds_what_was_asked_and_shares_among_workers() {
        let b = budget(80, 80, 0.85);
        assert_eq!(batch_cap(&b, 200_000, 1024).unwrap(), 1024);
        let small = MemoryBudget {
            free_bytes: 100 << 20,
            total_bytes: 100 << 20,
            fixed_bytes: 0,
            per_worker_bytes: 0,
            workers: 2,
            ..b
        };
        // 80 MiB usable, two workers of 1 MiB per row.
        assert_eq!(batch_cap(&small, 1 << 20, 1024).unwrap(), 40);
    }

    #[test]
    fn batch_cap_refuses_when_nothing_fits_or_the_fraction_is_wrong() {
        let full = MemoryBudget {
            free_bytes: 10 << 20,
            ..budget(0, 80, 0.85)
        };
        let err = batch_cap(&full, 1 << 20, 32).unwrap_err();
        assert!(err.contains("not one batch row fits"), "{err}");
        assert!(batch_cap(&budget(80, 80, 0.0), 1, 1).is_err());
        assert!(batch_cap(&budget(80, 80, 1.5), 1, 1).is_err());
    }

    #[test]
    fn buckets_are_powers_of_two_up_to_the_maximum() {
        assert_eq!(graph_buckets(1), vec![1]);
        assert_eq!(graph_buckets(32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(graph_buckets(100), vec![1, 2, 4, 8, 16, 32, 64, 100]);
        let b = graph_buckets(100);
        assert_eq!(bucket_for(&b, 1), Some(1));
        assert_eq!(bucket_for(&b, 3), Some(4));
        assert_eq!(bucket_for(&b, 65), Some(100));
        assert_eq!(bucket_for(&b, 101), None);
    }

    #[test]
    fn hidden_sizes_beyond_the_kernel_are_refused() {
        let mut model = reference();
        assert!(check_supported(&model).is_ok());
        if let SeqWeights::Lstm(lstm) = &mut model.seq[3] {
            lstm.hidden = 2048;
        }
        assert!(check_supported(&model).unwrap_err().contains("2048"));
    }

    /// An H200: 227 KiB of shared memory per block.
    const SHARED: usize = 227 << 10;

    #[test]
    fn the_reference_lstm_fits_a_cluster_of_four() {
        let one = cluster_shape(1, 128, 4, SHARED).unwrap();
        assert_eq!((one.cluster, one.rows_per_cluster, one.groups), (4, 1, 1));
        // 128 gate columns × 8 slices; 64 KiB of fp32 weights.
        assert_eq!(one.threads, 1024);
        assert_eq!(one.shared_bytes, (64 << 10) + 4 * 2 * 128 + 4 * 8 * 128);
        // Eight rows per cluster beyond one row: 125 clusters for 1000.
        let many = cluster_shape(1000, 128, 4, SHARED).unwrap();
        assert_eq!(
            (many.rows_per_cluster, many.groups, many.threads),
            (8, 125, 512)
        );
        // bf16 weights take half the space.
        let half = cluster_shape(8, 128, 2, SHARED).unwrap();
        assert_eq!(
            half.shared_bytes,
            (32 << 10) + 4 * 2 * 8 * 128 + 4 * 4 * 8 * 128
        );
    }

    #[test]
    fn larger_hidden_sizes_spread_over_more_blocks_or_fall_back() {
        // H = 256: a quarter of R is 256 KiB in fp32, an eighth fits.
        assert_eq!(cluster_shape(1, 256, 4, SHARED).unwrap().cluster, 8);
        // ...and a quarter fits in bf16.
        assert_eq!(cluster_shape(1, 256, 2, SHARED).unwrap().cluster, 4);
        // H = 512 in fp32 fits in neither: the per-step kernels run it.
        assert_eq!(cluster_shape(1, 512, 4, SHARED), None);
        // Hidden sizes the cluster does not divide, and no shared memory.
        assert_eq!(cluster_shape(1, 30, 4, SHARED), None);
        assert_eq!(cluster_shape(1, 128, 4, 16 << 10), None);
        assert_eq!(cluster_shape(0, 128, 4, SHARED), None);
    }

    #[test]
    fn small_hidden_sizes_keep_enough_threads_for_every_cell() {
        for hidden in [4, 8, 12, 16, 32, 64, 96, 128, 256] {
            for rows in [1, 2, 8, 9, 40, 300] {
                let Some(s) = cluster_shape(rows, hidden, 4, SHARED) else {
                    continue;
                };
                let units = hidden / s.cluster;
                assert!(s.threads >= s.rows_per_cluster * units, "{hidden} {rows}");
                assert!(s.threads <= if s.rows_per_cluster == 1 { 1024 } else { 512 });
                assert_eq!(s.threads % (4 * units), 0);
                assert!(s.groups * s.rows_per_cluster >= rows);
            }
        }
    }
}
