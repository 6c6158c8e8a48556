// A whole LSTM layer (every time step) in one launch, on a thread-block
// cluster (Hopper, sm_90 and up). Compiled by NVRTC apart from kernels.cu,
// only on GPUs that have clusters; no CUDA headers: the cluster operations
// are inline PTX.
//
// Why: at small batches a time step is a few microseconds of launch and
// dependency latency for a few hundred nanoseconds of arithmetic, and one
// block cannot keep the recurrent weights on chip (256 KiB in fp32 for
// H = 128). A cluster of CL blocks can: block q owns hidden units
// [q·U, (q+1)·U), U = H / CL, and keeps its slice of R (the 4U gate
// columns g·H + q·U + jj, all H rows: H·4U weights) in shared memory for
// the whole layer. Each step:
//   1. thread (col, ks) sums h_prev[r][k] · R[k][col] over its slice of k
//      for each of the group's rows; partial sums meet in shared memory;
//   2. thread (r, jj) adds the step's input projection, the bias and the
//      partial sums, finishes the cell for unit q·U + jj of row r (c stays
//      in a register), and stores h into the next-step h buffer of every
//      block of the cluster (distributed shared memory);
//   3. one cluster barrier (release/acquire) ends the step.
// h is double-buffered, so one barrier per step suffices: a block writes
// buffer (t+1)&1 of the others while they may still read buffer t&1.
// Each cluster runs ROWS rows (grid.y = ceil(B / ROWS) clusters); a block
// has at most 1024 threads for one row, 512 for eight (registers).
//
// Global layouts as in kernels.cu: gx [B, T, 4H] (gates i, o, f, c), R [H][4H],
// y [B, T, H] with row stride y_rs (not written when null), hlast [B, H].

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ unsigned int shared_address(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Every thread of every block of the cluster; orders shared-memory writes
// (local and remote) before the barrier with reads after it.
__device__ __forceinline__ void cluster_barrier() {
    asm volatile(
        "barrier.cluster.arrive.release.aligned;\n"
        "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Stores v at the address `local` has in block `rank`'s shared memory.
__device__ __forceinline__ void store_remote(unsigned int local, unsigned int rank, float v) {
    unsigned int remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)

#define LSTM_CLUSTER_KERNEL(NAME, WT, LOADW, ROWS, CL)                                         \
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(ROWS == 1 ? 1024 : 512) \
NAME(const float* __restrict__ gx, long gx_rs, const float* __restrict__ bias,                 \
     const WT* __restrict__ R, float* __restrict__ y, long y_rs,                               \
     float* __restrict__ hlast, int B, int H, int T) {                                         \
    extern __shared__ __align__(16) unsigned char smem_raw[];                                  \
    const int U = H / CL, C4 = 4 * U, G = 4 * H;                                               \
    const int tid = threadIdx.x, nthreads = blockDim.x;                                        \
    const int KS = nthreads / C4;                                                              \
    const unsigned int q = cluster_rank();                                                     \
    WT* ws = (WT*)smem_raw;                                    /* [H][C4] */                   \
    const long wbytes = ((long)H * C4 * sizeof(WT) + 15) & ~15L;                               \
    float* hbuf = (float*)(smem_raw + wbytes);                 /* [2][ROWS][H] */              \
    float* part = hbuf + 2 * ROWS * H;                         /* [KS][ROWS][C4] */            \
    const int b0 = blockIdx.y * ROWS;                                                          \
    const int nrows = B - b0 < ROWS ? B - b0 : ROWS;                                           \
    for (int idx = tid; idx < H * C4; idx += nthreads) {                                       \
        int k = idx / C4, cc = idx - k * C4, g = cc / U, jj = cc - g * U;                      \
        ws[idx] = R[(long)k * G + g * H + q * U + jj];                                         \
    }                                                                                          \
    for (int idx = tid; idx < 2 * ROWS * H; idx += nthreads) hbuf[idx] = 0.0f;                 \
    /* The cell thread of (row r, unit jj), and its constants. */                              \
    const bool cell = tid < nrows * U;                                                         \
    const int r_cell = cell ? tid / U : 0, jj_cell = cell ? tid - r_cell * U : 0;              \
    const int j = q * U + jj_cell;                                                             \
    float bias_g[4];                                                                           \
    _Pragma("unroll") for (int g = 0; g < 4; ++g) bias_g[g] = cell ? bias[g * H + j] : 0.0f;   \
    const float* gx_row = gx + (long)(b0 + r_cell) * gx_rs;                                    \
    float c_state = 0.0f;                                                                      \
    const unsigned int h_slot = shared_address(hbuf + r_cell * H + j);                         \
    /* The partial-product thread (col, ks) and its slice of k. */                             \
    const int col = tid % C4, ks = tid / C4;                                                   \
    const int per = (H + KS - 1) / KS;                                                         \
    const int k0 = ks * per, k1 = (k0 + per < H) ? k0 + per : H;                               \
    /* Every block has started (its shared memory exists) before any remote store. */          \
    cluster_barrier();                                                                         \
    for (int t = 0; t < T; ++t) {                                                              \
        const int cur = t & 1;                                                                 \
        float gv[4];                                                                           \
        if (cell) {                                                                            \
            _Pragma("unroll") for (int g = 0; g < 4; ++g) gv[g] = gx_row[(long)t * G + g * H + j]; \
        }                                                                                      \
        if (t > 0 && ks < KS) {                                                                \
            const float* hc = hbuf + cur * ROWS * H;                                           \
            float acc[ROWS];                                                                   \
            _Pragma("unroll") for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;                    \
            _Pragma("unroll 4") for (int k = k0; k < k1; ++k) {                                \
                float w = LOADW(ws[k * C4 + col]);                                             \
                _Pragma("unroll") for (int r = 0; r < ROWS; ++r)                               \
                    acc[r] = fmaf(hc[r * H + k], w, acc[r]);                                   \
            }                                                                                  \
            _Pragma("unroll") for (int r = 0; r < ROWS; ++r)                                   \
                part[(ks * ROWS + r) * C4 + col] = acc[r];                                     \
        }                                                                                      \
        __syncthreads();                                                                       \
        if (cell) {                                                                            \
            float s[4];                                                                        \
            _Pragma("unroll") for (int g = 0; g < 4; ++g) {                                    \
                float v = gv[g] + bias_g[g];                                                   \
                if (t > 0)                                                                     \
                    for (int x = 0; x < KS; ++x)                                               \
                        v += part[(x * ROWS + r_cell) * C4 + g * U + jj_cell];                 \
                s[g] = v;                                                                      \
            }                                                                                  \
            float ig = sigmoid_f(s[0]), og = sigmoid_f(s[1]);                                  \
            float fg = sigmoid_f(s[2]), gg = tanhf(s[3]);                                      \
            c_state = (t == 0) ? ig * gg : fmaf(fg, c_state, ig * gg);                         \
            float h = og * tanhf(c_state);                                                     \
            const unsigned int slot = h_slot + (unsigned int)((cur ^ 1) * ROWS * H * 4);       \
            _Pragma("unroll") for (unsigned int dst = 0; dst < CL; ++dst)                      \
                store_remote(slot, dst, h);                                                    \
            if (y) y[(long)(b0 + r_cell) * y_rs + (long)t * H + j] = h;                        \
            if (t == T - 1 && hlast) hlast[(long)(b0 + r_cell) * H + j] = h;                   \
        }                                                                                      \
        cluster_barrier();                                                                     \
    }                                                                                          \
}

LSTM_CLUSTER_KERNEL(lstm_cluster4_f32_r1, float, LOAD_F32, 1, 4)
LSTM_CLUSTER_KERNEL(lstm_cluster4_f32_r8, float, LOAD_F32, 8, 4)
LSTM_CLUSTER_KERNEL(lstm_cluster4_bf16_r1, bf16_t, LOAD_BF16, 1, 4)
LSTM_CLUSTER_KERNEL(lstm_cluster4_bf16_r8, bf16_t, LOAD_BF16, 8, 4)
LSTM_CLUSTER_KERNEL(lstm_cluster8_f32_r1, float, LOAD_F32, 1, 8)
LSTM_CLUSTER_KERNEL(lstm_cluster8_f32_r8, float, LOAD_F32, 8, 8)
LSTM_CLUSTER_KERNEL(lstm_cluster8_bf16_r1, bf16_t, LOAD_BF16, 1, 8)
LSTM_CLUSTER_KERNEL(lstm_cluster8_bf16_r8, bf16_t, LOAD_BF16, 8, 8)
