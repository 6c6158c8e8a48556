//! What one batch runs on the GPU: [`Device::enqueue`] puts every layer's
//! kernels and cuBLAS GEMMs for `rows` rows on the worker's stream (the
//! sequence a CUDA graph captures per bucket), choosing the cluster LSTM
//! kernel (one launch per layer) when the GPU has clusters and the layer
//! fits; the helpers pick launch shapes and wrap cuBLAS.

use super::*;

impl Device {
    /// Enqueues the forward pass for `rows` rows on the worker's stream,
    /// from its input buffer to its output buffer.
    pub(super) fn enqueue(&self, w: &Worker, rows: usize) -> DevResult<()> {
        let l = &w.layout;
        let buf = |offset: usize| w.base + offset as u64;
        let mut src = buf(l.input);
        let mut time = self.time_steps;
        let mut channels = self.features;
        // Where the last-step vector ends up, `[rows, channels]`.
        let mut vec_ptr = None;
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            let dst = buf(l.act[index % 2]);
            match layer {
                Layer::Conv {
                    cin,
                    cout,
                    kernel,
                    pad,
                    out_time,
                    taps,
                    bias,
                    relu,
                } => {
                    let col = buf(l.col);
                    let n = rows * out_time * kernel * cin;
                    let mut b = w.stream.launch_builder(&self.kernels.im2col);
                    let (bi, ti, ci, ki, pi, oi) = (
                        rows as i32,
                        time as i32,
                        *cin as i32,
                        *kernel as i32,
                        *pad as i32,
                        *out_time as i32,
                    );
                    b.arg(&src)
                        .arg(&col)
                        .arg(&bi)
                        .arg(&ti)
                        .arg(&ci)
                        .arg(&ki)
                        .arg(&pi)
                        .arg(&oi);
                    unsafe { b.launch(elementwise(n)) }.map_err(err("im2col launch"))?;
                    self.gemm(
                        w,
                        rows * out_time,
                        *cout,
                        kernel * cin,
                        col,
                        *taps,
                        dst,
                        buf(l.low),
                    )?;
                    self.bias_act(w, dst, *bias, rows * out_time, *cout, *relu)?;
                    time = *out_time;
                    channels = *cout;
                    src = dst;
                }
                Layer::Lstm {
                    input,
                    hidden,
                    w: wm,
                    r,
                    bias,
                } => {
                    let h = *hidden;
                    let gates = buf(l.gates);
                    self.gemm(w, rows * time, 4 * h, *input, src, *wm, gates, buf(l.low))?;
                    let last_only = index == last;
                    if let Some((func, cfg)) = self.cluster_config(rows, h, r.bf16.is_some()) {
                        let rptr = r.bf16.unwrap_or(r.f32);
                        let (y, y_rs) = if last_only {
                            (0u64, 0i64)
                        } else {
                            (dst, (time * h) as i64)
                        };
                        let hlast = buf(l.h[0]);
                        let gx_rs = (time * 4 * h) as i64;
                        let (bi, hi, ti) = (rows as i32, h as i32, time as i32);
                        let mut b = w.stream.launch_builder(func);
                        b.arg(&gates)
                            .arg(&gx_rs)
                            .arg(bias)
                            .arg(&rptr)
                            .arg(&y)
                            .arg(&y_rs)
                            .arg(&hlast)
                            .arg(&bi)
                            .arg(&hi)
                            .arg(&ti);
                        unsafe { b.launch(cfg) }.map_err(err("cluster LSTM launch"))?;
                        channels = h;
                        if last_only {
                            vec_ptr = Some(hlast);
                            time = 1;
                        }
                        src = dst;
                        continue;
                    }
                    let step_gemm = rows >= self.step_gemm_min_rows;
                    let (rows_per_block, slices) = if rows <= NARROW_MAX_ROWS {
                        NARROW
                    } else {
                        WIDE
                    };
                    let (func, rptr) = match (r.bf16, rows <= NARROW_MAX_ROWS) {
                        (Some(p), true) => (&self.kernels.lstm_bf16_narrow, p),
                        (Some(p), false) => (&self.kernels.lstm_bf16_wide, p),
                        (None, true) => (&self.kernels.lstm_f32_narrow, r.f32),
                        (None, false) => (&self.kernels.lstm_f32_wide, r.f32),
                    };
                    let cfg = LaunchConfig {
                        grid_dim: (
                            (h as u32).div_ceil(32),
                            (rows as u32).div_ceil(rows_per_block),
                            1,
                        ),
                        block_dim: (32, slices, 1),
                        shared_mem_bytes: 4
                            * (rows_per_block * h as u32 + slices * rows_per_block * 128),
                    };
                    let c = buf(l.c);
                    // The bf16 copy of h for the next step's bf16 GEMM
                    // (the `low` buffer is free once the projection ran).
                    let hlow = if step_gemm && r.bf16.is_some() {
                        buf(l.low)
                    } else {
                        0u64
                    };
                    let (bi, hi) = (rows as i32, h as i32);
                    let gx_rs = (time * 4 * h) as i64;
                    for t in 0..time {
                        let (hp, hp_rs, hn, hn_rs) = if last_only {
                            (buf(l.h[(t + 1) % 2]), h as i64, buf(l.h[t % 2]), h as i64)
                        } else {
                            let prev = dst + (4 * t.saturating_sub(1) * h) as u64;
                            (
                                prev,
                                (time * h) as i64,
                                dst + (4 * t * h) as u64,
                                (time * h) as i64,
                            )
                        };
                        let gx = gates + (4 * t * 4 * h) as u64;
                        let first = i32::from(t == 0);
                        if step_gemm {
                            if t > 0 {
                                // gx_t += h_prev · R
                                let (a, lda, ty) = match r.bf16 {
                                    Some(_) => (hlow, h, blas::cudaDataType::CUDA_R_16BF),
                                    None => (hp, hp_rs as usize, blas::cudaDataType::CUDA_R_32F),
                                };
                                self.gemm_raw(
                                    w,
                                    rows,
                                    4 * h,
                                    h,
                                    (a, lda),
                                    (rptr, 4 * h),
                                    ty,
                                    (gx, gx_rs as usize),
                                    1.0,
                                )?;
                            }
                            let mut b = w.stream.launch_builder(&self.kernels.lstm_cell);
                            b.arg(&gx)
                                .arg(&gx_rs)
                                .arg(bias)
                                .arg(&c)
                                .arg(&hn)
                                .arg(&hn_rs)
                                .arg(&hlow)
                                .arg(&bi)
                                .arg(&hi)
                                .arg(&first);
                            unsafe { b.launch(elementwise(rows * h)) }
                                .map_err(err("LSTM cell launch"))?;
                            continue;
                        }
                        let mut b = w.stream.launch_builder(func);
                        b.arg(&gx)
                            .arg(&gx_rs)
                            .arg(bias)
                            .arg(&rptr)
                            .arg(&hp)
                            .arg(&hp_rs)
                            .arg(&hn)
                            .arg(&hn_rs)
                            .arg(&c)
                            .arg(&bi)
                            .arg(&hi)
                            .arg(&first);
                        unsafe { b.launch(cfg) }.map_err(err("LSTM step launch"))?;
                    }
                    channels = h;
                    if last_only {
                        vec_ptr = Some(buf(l.h[(time + 1) % 2]));
                        time = 1;
                    }
                    src = dst;
                }
            }
        }
        let vec = match vec_ptr {
            Some(p) => p,
            None if self.layers.is_empty() => src,
            None => {
                let out = buf(l.head[0]);
                let mut b = w.stream.launch_builder(&self.kernels.last_step);
                let (bi, ti, ci) = (rows as i32, time as i32, channels as i32);
                b.arg(&src).arg(&out).arg(&bi).arg(&ti).arg(&ci);
                unsafe { b.launch(elementwise(rows * channels)) }
                    .map_err(err("last-step launch"))?;
                out
            }
        };
        let mut src = vec;
        let last_head = self.head.len().saturating_sub(1);
        for (index, linear) in self.head.iter().enumerate() {
            let dst = if index == last_head {
                buf(l.output)
            } else {
                buf(l.head[(index + 1) % 2])
            };
            self.gemm(
                w,
                rows,
                linear.output,
                linear.input,
                src,
                linear.w,
                dst,
                buf(l.low),
            )?;
            self.bias_act(w, dst, linear.bias, rows, linear.output, linear.relu)?;
            src = dst;
        }
        if self.head.is_empty() {
            let bytes = rows * self.output_width * 4;
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    buf(l.output),
                    src,
                    bytes,
                    w.stream.cu_stream(),
                )
            }
            .map_err(err("copy of the output"))?;
        }
        Ok(())
    }

    /// The cluster layer kernel and its launch for `rows` rows of hidden
    /// size `h`, when it applies (see [`crate::plan::cluster_shape`]).
    pub(super) fn cluster_config(
        &self,
        rows: usize,
        h: usize,
        bf16: bool,
    ) -> Option<(&CudaFunction, LaunchConfig)> {
        let kernels = self.kernels.cluster.as_ref()?;
        if rows > self.cluster_max_rows {
            return None;
        }
        let weight_bytes = if bf16 { 2 } else { 4 };
        let shape = crate::plan::cluster_shape(rows, h, weight_bytes, kernels.max_shared)?;
        let func = kernels.get(&shape, bf16)?;
        Some((
            func,
            LaunchConfig {
                grid_dim: (shape.cluster as u32, shape.groups as u32, 1),
                block_dim: (shape.threads as u32, 1, 1),
                shared_mem_bytes: shape.shared_bytes as u32,
            },
        ))
    }

    pub(super) fn bias_act(
        &self,
        w: &Worker,
        y: u64,
        bias: u64,
        rows: usize,
        n: usize,
        relu: bool,
    ) -> DevResult<()> {
        let mut b = w.stream.launch_builder(&self.kernels.bias_act);
        let (r, ni, ri) = (rows as i64, n as i32, i32::from(relu));
        b.arg(&y).arg(&bias).arg(&r).arg(&ni).arg(&ri);
        unsafe { b.launch(elementwise(rows * n)) }.map_err(err("bias launch"))?;
        Ok(())
    }

    /// Row-major `c[m, n] = a[m, k] · b[k, n]` (`b` a weight matrix) in the
    /// engine's precision; a bf16 weight makes `a` go through `low` first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        w: &Worker,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: Mat,
        c: u64,
        low: u64,
    ) -> DevResult<()> {
        let (a_ptr, b_ptr, ty) = match b.bf16 {
            Some(b16) => {
                let mut l = w.stream.launch_builder(&self.kernels.to_bf16);
                let count = (m * k) as i64;
                l.arg(&a).arg(&low).arg(&count);
                unsafe { l.launch(elementwise(m * k)) }.map_err(err("bf16 conversion launch"))?;
                (low, b16, blas::cudaDataType::CUDA_R_16BF)
            }
            None => (a, b.f32, blas::cudaDataType::CUDA_R_32F),
        };
        self.gemm_raw(w, m, n, k, (a_ptr, k), (b_ptr, n), ty, (c, n), 0.0)
    }

    /// Row-major `c[m, n] = a[m, k] · b[k, n] + beta · c` with leading
    /// dimensions (`(pointer, row stride)` each); `a` and `b` of type `ty`,
    /// `c` fp32; fp32 inputs use TF32 tensor cores at tf32.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_raw(
        &self,
        w: &Worker,
        m: usize,
        n: usize,
        k: usize,
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        ty: blas::cudaDataType,
        (c, ldc): (u64, usize),
        beta: f32,
    ) -> DevResult<()> {
        let compute =
            if ty == blas::cudaDataType::CUDA_R_32F && self.precision == CudaPrecision::Tf32 {
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        let alpha = 1.0f32;
        // Column-major cuBLAS sees the row-major product transposed:
        // cᵀ[n, m] = bᵀ[n, k] · aᵀ[k, m].
        unsafe {
            blas::cublasGemmEx(
                *w.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_N,
                blas::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                ty,
                ldb as i32,
                a as *const c_void,
                ty,
                lda as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas::cudaDataType::CUDA_R_32F,
                ldc as i32,
                compute,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .result()
        .map_err(err("cuBLAS GEMM failed"))
    }
}
