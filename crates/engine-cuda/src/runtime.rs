//! Everything that touches the GPU: the context, the NVRTC-compiled
//! kernels, the weights on the device, and the workers (a stream, a cuBLAS
//! handle, the batch buffers, pinned host buffers and one CUDA graph per
//! batch bucket each).
//!
//! Every device buffer is addressed by raw pointer (`u64`) into one arena
//! per worker, laid out by [`crate::plan::BufferPlan`]; cudarc's event
//! tracking is off because each worker's memory is only ever used on that
//! worker's stream.
//!
//! This file sets the device up (context, kernels, weights, workers, graph
//! capture); the per-batch launch sequence is in `launch`.

use std::ffi::{CStr, CString, c_void};
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::sys as drv;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use tickserve_engine_native::{LinearWeights, ModelWeights, SeqWeights};

use crate::CudaPrecision;
use crate::plan::{BufferPlan, CUBLAS_WORKSPACE_BYTES, ClusterShape, Layout};

mod launch;

const KERNELS: &str = include_str!("kernels.cu");
/// The cluster kernels: compiled only on GPUs with thread-block clusters.
const CLUSTER_KERNELS: &str = include_str!("kernels_cluster.cu");
/// The fused step kernel's two shapes (kernels.cu): rows per block and
/// reduction slices (warps) per block.
const WIDE: (u32, u32) = (8, 4);
const NARROW: (u32, u32) = (2, 8);
/// Batches up to this many rows use the narrow step kernel.
const NARROW_MAX_ROWS: usize = 8;

/// A failure on the device, as text for `EngineError`.
pub(crate) type DevResult<T> = Result<T, String>;

fn err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e:?}")
}

/// The compiled kernels.
#[derive(Debug)]
struct Kernels {
    im2col: CudaFunction,
    bias_act: CudaFunction,
    to_bf16: CudaFunction,
    last_step: CudaFunction,
    lstm_f32_wide: CudaFunction,
    lstm_bf16_wide: CudaFunction,
    lstm_f32_narrow: CudaFunction,
    lstm_bf16_narrow: CudaFunction,
    lstm_cell: CudaFunction,
    /// `None` on GPUs without clusters (before Hopper), or when they did
    /// not compile (logged).
    cluster: Option<ClusterKernels>,
}

/// The cluster layer kernels (kernels_cluster.cu), by cluster size, rows
/// per cluster and weight type.
#[derive(Debug)]
struct ClusterKernels {
    /// `(cluster, rows per cluster, bf16, kernel)`.
    functions: Vec<(usize, usize, bool, CudaFunction)>,
    /// Dynamic shared memory a block may opt in to, bytes.
    max_shared: usize,
}

impl ClusterKernels {
    fn get(&self, shape: &ClusterShape, bf16: bool) -> Option<&CudaFunction> {
        self.functions
            .iter()
            .find(|(c, r, b, _)| *c == shape.cluster && *r == shape.rows_per_cluster && *b == bf16)
            .map(|(.., f)| f)
    }
}

/// A weight matrix on the device: fp32 always, bf16 when the layer runs in
/// bf16.
#[derive(Debug, Clone, Copy)]
struct Mat {
    f32: u64,
    bf16: Option<u64>,
}

#[derive(Debug)]
enum Layer {
    Conv {
        cin: usize,
        cout: usize,
        kernel: usize,
        pad: usize,
        out_time: usize,
        taps: Mat,
        bias: u64,
        relu: bool,
    },
    Lstm {
        input: usize,
        hidden: usize,
        w: Mat,
        r: Mat,
        bias: u64,
    },
}

#[derive(Debug)]
struct Linear {
    input: usize,
    output: usize,
    w: Mat,
    bias: u64,
    relu: bool,
}

/// The model on one GPU: context, kernels and weights, shared by workers.
#[derive(Debug)]
pub(crate) struct Device {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    _weights: CudaSlice<u8>,
    weight_bytes: usize,
    layers: Vec<Layer>,
    head: Vec<Linear>,
    time_steps: usize,
    features: usize,
    output_width: usize,
    precision: CudaPrecision,
    plan: BufferPlan,
    name: String,
    /// From this many rows, a time step is a cuBLAS GEMM (the recurrent
    /// product, on tensor cores at tf32/bf16) and the cell kernel, instead
    /// of the fused step kernel.
    step_gemm_min_rows: usize,
    /// Batches up to this many rows run each LSTM layer as one cluster
    /// kernel (when the GPU has clusters and the layer fits); 0: never.
    cluster_max_rows: usize,
}

/// Host-side weight arena under construction (256-byte aligned pieces).
#[derive(Default)]
struct Arena {
    bytes: Vec<u8>,
}

impl Arena {
    fn push_f32(&mut self, values: &[f32]) -> usize {
        let at = self.bytes.len();
        for v in values {
            self.bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.align();
        at
    }

    fn push_bf16(&mut self, values: &[f32]) -> usize {
        let at = self.bytes.len();
        for v in values {
            self.bytes.extend_from_slice(&bf16_bits(*v).to_le_bytes());
        }
        self.align();
        at
    }

    fn align(&mut self) {
        let len = self.bytes.len().div_ceil(256) * 256;
        self.bytes.resize(len, 0);
    }
}

/// `v` rounded to bfloat16 (nearest even), as its bits.
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (rounded >> 16) as u16
}

impl Device {
    /// Opens device `ordinal`, compiles the kernels and uploads the weights.
    pub(crate) fn new(
        ordinal: usize,
        model: &ModelWeights,
        precision: CudaPrecision,
        step_gemm_min_rows: usize,
        cluster_max_rows: usize,
    ) -> DevResult<Device> {
        let ctx = CudaContext::new(ordinal).map_err(err("cannot open the CUDA device"))?;
        // Each worker's buffers are used on its own stream only.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(err("cannot read the compute capability"))?;
        let kernels = compile(&ctx, major, minor)?;

        // Which layers run their GEMMs in bf16: all but the first sequence
        // layer and the last head layer (the native engine's rule: those
        // two made most of bf16's error for a few % of the work).
        let low =
            |index: usize, last: bool| precision == CudaPrecision::Bf16 && index != 0 && !last;
        let mut arena = Arena::default();
        let mut pending_seq = Vec::new();
        let mut time = model.time_steps;
        for (index, layer) in model.seq.iter().enumerate() {
            let bf = low(index, false);
            match layer {
                SeqWeights::Conv(conv) => {
                    let out_time = conv.out_time(time);
                    let t = arena.push_f32(&conv.taps);
                    let tb = bf.then(|| arena.push_bf16(&conv.taps));
                    let b = arena.push_f32(&conv.bias);
                    pending_seq.push((
                        PendingLayer::Conv {
                            cin: conv.in_channels,
                            cout: conv.out_channels,
                            kernel: conv.kernel,
                            pad: conv.pad_begin,
                            out_time,
                            relu: conv.relu,
                        },
                        [Some(t), tb, None, None, Some(b)],
                    ));
                    time = out_time;
                }
                SeqWeights::Lstm(lstm) => {
                    let w = arena.push_f32(&lstm.w_t);
                    let wb = bf.then(|| arena.push_bf16(&lstm.w_t));
                    let r = arena.push_f32(&lstm.r_t);
                    let rb = bf.then(|| arena.push_bf16(&lstm.r_t));
                    let b = arena.push_f32(&lstm.bias);
                    pending_seq.push((
                        PendingLayer::Lstm {
                            input: lstm.input,
                            hidden: lstm.hidden,
                        },
                        [Some(w), wb, Some(r), rb, Some(b)],
                    ));
                }
            }
        }
        let mut pending_head: Vec<(&LinearWeights, usize, Option<usize>, usize)> = Vec::new();
        let last_head = model.head.len().saturating_sub(1);
        for (index, linear) in model.head.iter().enumerate() {
            let bf = precision == CudaPrecision::Bf16 && index != last_head;
            let w = arena.push_f32(&linear.w_t);
            let wb = bf.then(|| arena.push_bf16(&linear.w_t));
            let b = arena.push_f32(&linear.bias);
            pending_head.push((linear, w, wb, b));
        }
        let stream = ctx.default_stream();
        let weights = stream
            .clone_htod(&arena.bytes)
            .map_err(err("cannot upload the weights"))?;
        stream
            .synchronize()
            .map_err(err("cannot upload the weights"))?;
        let base = {
            let (ptr, _sync) = weights.device_ptr(&stream);
            ptr
        };
        let at = |offset: usize| base + offset as u64;
        let layers = pending_seq
            .into_iter()
            .map(|(layer, [a, ab, r, rb, b])| {
                let a = Mat {
                    f32: at(a.unwrap_or(0)),
                    bf16: ab.map(at),
                };
                let bias = at(b.unwrap_or(0));
                match layer {
                    PendingLayer::Conv {
                        cin,
                        cout,
                        kernel,
                        pad,
                        out_time,
                        relu,
                    } => Layer::Conv {
                        cin,
                        cout,
                        kernel,
                        pad,
                        out_time,
                        taps: a,
                        bias,
                        relu,
                    },
                    PendingLayer::Lstm { input, hidden } => Layer::Lstm {
                        input,
                        hidden,
                        w: a,
                        r: Mat {
                            f32: at(r.unwrap_or(0)),
                            bf16: rb.map(at),
                        },
                        bias,
                    },
                }
            })
            .collect();
        let head = pending_head
            .into_iter()
            .map(|(l, w, wb, b)| Linear {
                input: l.input,
                output: l.output,
                w: Mat {
                    f32: at(w),
                    bf16: wb.map(at),
                },
                bias: at(b),
                relu: l.relu,
            })
            .collect();
        Ok(Device {
            ctx,
            kernels,
            weight_bytes: arena.bytes.len(),
            _weights: weights,
            layers,
            head,
            time_steps: model.time_steps,
            features: model.features,
            output_width: model.output_width,
            precision,
            plan: BufferPlan::new(model),
            name,
            step_gemm_min_rows,
            cluster_max_rows,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether LSTM layers can run as cluster kernels on this GPU.
    pub(crate) fn has_clusters(&self) -> bool {
        self.kernels.cluster.is_some()
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// `(free, total)` device memory in bytes.
    pub(crate) fn memory(&self) -> DevResult<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(err("cannot read the GPU's memory"))
    }

    /// A worker with buffers for `max_rows` rows.
    pub(crate) fn worker(&self, max_rows: usize) -> DevResult<Worker> {
        self.ctx
            .bind_to_thread()
            .map_err(err("cannot bind the CUDA context"))?;
        let stream = self
            .ctx
            .new_stream()
            .map_err(err("cannot create a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(err("cannot create a cuBLAS handle"))?;
        let workspace = stream
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)
            .map_err(err("cannot allocate the cuBLAS workspace"))?;
        let layout = self.plan.layout(max_rows);
        let arena = stream
            .alloc_zeros::<u8>(layout.bytes)
            .map_err(err("cannot allocate the batch buffers"))?;
        let (ws_ptr, base) = {
            let (w, _s1) = workspace.device_ptr(&stream);
            let (a, _s2) = arena.device_ptr(&stream);
            (w, a)
        };
        unsafe {
            blas::cublasSetWorkspace_v2(
                *blas.handle(),
                ws_ptr as *mut c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(err("cannot set the cuBLAS workspace"))?;
        let input_len = max_rows * self.time_steps * self.features;
        let output_len = max_rows * self.output_width;
        // Input: write-combined (the host only writes it). Output: cached,
        // the host reads it.
        let pin_in = unsafe { self.ctx.alloc_pinned::<f32>(input_len) }
            .map_err(err("cannot allocate pinned host memory"))?;
        let pin_out = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(output_len, 0) }
            .map_err(err("cannot allocate pinned host memory"))?;
        stream
            .synchronize()
            .map_err(err("cannot allocate the batch buffers"))?;
        Ok(Worker {
            stream,
            blas,
            _workspace: workspace,
            _arena: arena,
            base,
            layout,
            max_rows,
            pin_in,
            pin_out,
            graphs: Vec::new(),
        })
    }

    /// Runs `rows` rows (`rows ≤ worker.max_rows`) from `input` into `output`.
    pub(crate) fn run(
        &self,
        worker: &mut Worker,
        rows: usize,
        input: &[f32],
        output: &mut [f32],
    ) -> DevResult<()> {
        // The scheduler calls from its own threads: the raw driver and
        // cuBLAS calls below need the context current on this one.
        self.ctx
            .bind_to_thread()
            .map_err(err("cannot bind the CUDA context"))?;
        let cu = worker.stream.cu_stream();
        {
            let pin = worker.pin_in.as_mut_slice().map_err(err("pinned input"))?;
            pin[..input.len()].copy_from_slice(input);
        }
        let pin = worker.pin_in.as_slice().map_err(err("pinned input"))?;
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                worker.base + worker.layout.input as u64,
                &pin[..input.len()],
                cu,
            )
        }
        .map_err(err("copy to the GPU failed"))?;
        match worker.graph_for(rows) {
            Some(graph) => graph.launch().map_err(err("graph launch failed"))?,
            None => self.enqueue(worker, rows)?,
        }
        let out_len = rows * self.output_width;
        {
            let pout = worker
                .pin_out
                .as_mut_slice()
                .map_err(err("pinned output"))?;
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut pout[..out_len],
                    worker.base + worker.layout.output as u64,
                    cu,
                )
            }
            .map_err(err("copy from the GPU failed"))?;
        }
        worker
            .stream
            .synchronize()
            .map_err(err("the forward pass failed"))?;
        let pout = worker.pin_out.as_slice().map_err(err("pinned output"))?;
        output.copy_from_slice(&pout[..out_len]);
        Ok(())
    }

    /// Runs once eagerly at every bucket size (loading cuBLAS's kernels),
    /// then captures one CUDA graph per bucket.
    pub(crate) fn capture(&self, worker: &mut Worker, buckets: &[usize]) -> DevResult<()> {
        self.ctx
            .bind_to_thread()
            .map_err(err("cannot bind the CUDA context"))?;
        for &rows in buckets {
            self.enqueue(worker, rows)?;
            worker.stream.synchronize().map_err(err("warm-up failed"))?;
            worker
                .stream
                .begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(err("cannot begin graph capture"))?;
            let enqueued = self.enqueue(worker, rows);
            let graph = worker
                .stream
                .end_capture(drv::CUgraphInstantiate_flags(0))
                .map_err(err("cannot end graph capture"))?;
            enqueued?;
            let graph = graph.ok_or_else(|| "graph capture returned no graph".to_string())?;
            graph.upload().map_err(err("cannot upload a graph"))?;
            worker.graphs.push((rows, graph));
        }
        worker
            .stream
            .synchronize()
            .map_err(err("graph upload failed"))?;
        Ok(())
    }
}

enum PendingLayer {
    Conv {
        cin: usize,
        cout: usize,
        kernel: usize,
        pad: usize,
        out_time: usize,
        relu: bool,
    },
    Lstm {
        input: usize,
        hidden: usize,
    },
}

fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_536) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Compiles CUDA C source to a CUBIN for this GPU's architecture (a CUBIN
/// does not depend on the driver accepting NVRTC's PTX version) and loads it.
fn compile_module(
    ctx: &Arc<CudaContext>,
    source: &str,
    file: &str,
    major: i32,
    minor: i32,
) -> DevResult<Arc<CudaModule>> {
    use cudarc::nvrtc::{result as nvrtc, sys as nv};
    let src = CString::new(source).map_err(err("kernel source"))?;
    let name = CString::new(file).map_err(err("kernel source"))?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(err("NVRTC create"))?;
    let options = [
        format!("--gpu-architecture=sm_{major}{minor}"),
        "--std=c++17".to_string(),
    ];
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|raw| {
            let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
            CStr::from_bytes_until_nul(&bytes)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        unsafe { nvrtc::destroy_program(prog) }.ok();
        return Err(format!(
            "NVRTC could not compile {file} ({e:?}, options {options:?}):\n{log}"
        ));
    }
    let mut size = 0usize;
    let cubin = unsafe {
        nv::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .and_then(|()| {
                let mut data = vec![0u8; size];
                nv::nvrtcGetCUBIN(prog, data.as_mut_ptr() as *mut std::ffi::c_char)
                    .result()
                    .map(|()| data)
            })
    };
    unsafe { nvrtc::destroy_program(prog) }.ok();
    let cubin = cubin.map_err(err("NVRTC CUBIN"))?;
    ctx.load_module(Ptx::from_binary(cubin))
        .map_err(err("cannot load the compiled kernels"))
}

fn function(module: &Arc<CudaModule>, name: &str) -> DevResult<CudaFunction> {
    module
        .load_function(name)
        .map_err(|e| format!("kernel {name} missing: {e:?}"))
}

/// Compiles every kernel this GPU can run: kernels.cu always, the cluster
/// kernels from compute capability 9.0 (a failure there only turns them
/// off, with a warning).
fn compile(ctx: &Arc<CudaContext>, major: i32, minor: i32) -> DevResult<Kernels> {
    let module = compile_module(ctx, KERNELS, "tickserve_kernels.cu", major, minor)?;
    let f = |name: &str| function(&module, name);
    let cluster = if major >= 9 {
        match compile_cluster(ctx, major, minor) {
            Ok(kernels) => Some(kernels),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "CUDA engine: the cluster LSTM kernels are unavailable; using one kernel per time step"
                );
                None
            }
        }
    } else {
        None
    };
    Ok(Kernels {
        im2col: f("im2col")?,
        bias_act: f("bias_act")?,
        to_bf16: f("to_bf16")?,
        last_step: f("last_step")?,
        lstm_f32_wide: f("lstm_step_f32_wide")?,
        lstm_bf16_wide: f("lstm_step_bf16_wide")?,
        lstm_f32_narrow: f("lstm_step_f32_narrow")?,
        lstm_bf16_narrow: f("lstm_step_bf16_narrow")?,
        lstm_cell: f("lstm_cell")?,
        cluster,
    })
}

fn compile_cluster(ctx: &Arc<CudaContext>, major: i32, minor: i32) -> DevResult<ClusterKernels> {
    let module = compile_module(ctx, CLUSTER_KERNELS, "tickserve_cluster.cu", major, minor)?;
    let optin = ctx
        .attribute(drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(err("cannot read the shared memory limit"))?;
    let max_shared = usize::try_from(optin).unwrap_or(0);
    let mut functions = Vec::new();
    for cluster in crate::plan::CLUSTER_SIZES {
        for rows in crate::plan::CLUSTER_ROWS {
            for bf16 in [false, true] {
                let ty = if bf16 { "bf16" } else { "f32" };
                let f = function(&module, &format!("lstm_cluster{cluster}_{ty}_r{rows}"))?;
                f.set_attribute(
                    drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    optin,
                )
                .map_err(err("cannot raise the cluster kernel's shared memory"))?;
                functions.push((cluster, rows, bf16, f));
            }
        }
    }
    Ok(ClusterKernels {
        functions,
        max_shared,
    })
}

/// One stream's worth of state: used by one thread at a time.
pub(crate) struct Worker {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    _arena: CudaSlice<u8>,
    base: u64,
    layout: Layout,
    pub(crate) max_rows: usize,
    pin_in: PinnedHostSlice<f32>,
    pin_out: PinnedHostSlice<f32>,
    /// `(bucket rows, graph)`, ascending.
    graphs: Vec<(usize, CudaGraph)>,
}

// Safety: a worker is only ever used by the one thread that took it from
// the engine's pool; its raw handles (graph, pinned memory) are not shared.
unsafe impl Send for Worker {}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("max_rows", &self.max_rows)
            .field("graphs", &self.graphs.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    fn graph_for(&self, rows: usize) -> Option<&CudaGraph> {
        self.graphs
            .iter()
            .find(|(bucket, _)| *bucket >= rows)
            .map(|(_, g)| g)
    }

    pub(crate) fn graphs(&self) -> usize {
        self.graphs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
    }
}
