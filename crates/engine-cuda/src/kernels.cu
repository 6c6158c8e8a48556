// tickserve's CUDA kernels for the CNN+LSTM family, compiled at run time by
// NVRTC (no CUDA headers needed: bf16 is handled as raw 16-bit words).
//
// Layouts (row-major, sample-major, as in the native engine):
//   activations [B, T, C]; LSTM input projection gx [B, T, 4H], gates in
//   ONNX order (i, o, f, c); recurrent weights R [H][4H].

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// Round to nearest even (NaN stays NaN).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// col[(b*Tout + t), tap*Cin + ci] = x[b, t + tap - pad, ci] or 0 outside.
extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ col,
                                  int B, int T, int Cin, int K, int pad, int Tout) {
    long total = (long)B * Tout * K * Cin;
    long width = (long)K * Cin;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        long row = idx / width;
        int w = (int)(idx - row * width);
        int tap = w / Cin, ci = w - tap * Cin;
        int b = (int)(row / Tout), t = (int)(row - (long)b * Tout);
        int src = t + tap - pad;
        col[idx] = (src >= 0 && src < T) ? x[((long)b * T + src) * Cin + ci] : 0.0f;
    }
}

// y[r, n] = act(y[r, n] + bias[n]) for rows*n values.
extern "C" __global__ void bias_act(float* __restrict__ y, const float* __restrict__ bias,
                                    long rows, int n, int relu) {
    long total = rows * n;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        float v = y[idx] + bias[idx % n];
        y[idx] = (relu && v < 0.0f) ? 0.0f : v;
    }
}

extern "C" __global__ void to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, long n) {
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n;
         idx += (long)gridDim.x * blockDim.x) {
        y[idx] = f32_to_bf16(x[idx]);
    }
}

// out[b, c] = x[b, T-1, c]
extern "C" __global__ void last_step(const float* __restrict__ x, float* __restrict__ out,
                                     int B, int T, int C) {
    long total = (long)B * C;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        long b = idx / C;
        int c = (int)(idx - b * C);
        out[idx] = x[(b * T + T - 1) * C + c];
    }
}

// One LSTM time step for every row, fused: recurrent product h_prev · R,
// plus the step's input projection gx and the bias, the gates and the cell
// update. Block (32, KS): threadIdx.x picks a hidden unit j, threadIdx.y a
// slice of the reduction over k; each block runs ROWS rows, so every
// weight read from L2 feeds ROWS rows. Partial sums meet in shared memory.
// `first`: h_prev = c = 0 (step 0), no recurrent term. Two shapes: "wide"
// (8 rows, 4 slices) for batches, "narrow" (2 rows, 8 slices: more
// blocks and shorter loops) for one or a few rows, where latency rules.
#define LSTM_STEP_KERNEL(NAME, WT, LOADW, ROWS, KS)                                            \
extern "C" __global__ void __launch_bounds__(32 * KS)                                          \
NAME(const float* __restrict__ gx, long gx_rs, const float* __restrict__ bias,                 \
     const WT* __restrict__ R, const float* __restrict__ hp, long hp_rs,                       \
     float* __restrict__ hn, long hn_rs, float* __restrict__ c, int B, int H, int first) {     \
    extern __shared__ float smem[];                                                            \
    float* hs = smem;                                  /* [ROWS][H] */                         \
    float* part = smem + ROWS * H;                     /* [KS][ROWS][4][32] */                 \
    const int b0 = blockIdx.y * ROWS;                                                          \
    const int nrows = imin(ROWS, B - b0);                                                      \
    const int tid = threadIdx.y * 32 + threadIdx.x;                                            \
    if (!first) {                                                                              \
        for (int idx = tid; idx < nrows * H; idx += 32 * KS) {                                 \
            int r = idx / H, k = idx - r * H;                                                  \
            hs[idx] = hp[(long)(b0 + r) * hp_rs + k];                                          \
        }                                                                                      \
    }                                                                                          \
    __syncthreads();                                                                           \
    const int j = blockIdx.x * 32 + threadIdx.x;                                               \
    float acc[ROWS][4];                                                                        \
    _Pragma("unroll") for (int r = 0; r < ROWS; ++r)                                           \
        _Pragma("unroll") for (int g = 0; g < 4; ++g) acc[r][g] = 0.0f;                        \
    if (!first && j < H) {                                                                     \
        const int per = (H + KS - 1) / KS;                                                     \
        const int k0 = threadIdx.y * per, k1 = imin(H, k0 + per);                              \
        const long G = 4L * H;                                                                 \
        _Pragma("unroll 4") for (int k = k0; k < k1; ++k) {                                    \
            const WT* row = R + (long)k * G + j;                                               \
            float w0 = LOADW(row[0]), w1 = LOADW(row[H]);                                      \
            float w2 = LOADW(row[2 * H]), w3 = LOADW(row[3 * H]);                              \
            _Pragma("unroll") for (int r = 0; r < ROWS; ++r) {                                 \
                float h = (r < nrows) ? hs[r * H + k] : 0.0f;                                  \
                acc[r][0] = fmaf(h, w0, acc[r][0]);                                            \
                acc[r][1] = fmaf(h, w1, acc[r][1]);                                            \
                acc[r][2] = fmaf(h, w2, acc[r][2]);                                            \
                acc[r][3] = fmaf(h, w3, acc[r][3]);                                            \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    _Pragma("unroll") for (int r = 0; r < ROWS; ++r)                                           \
        _Pragma("unroll") for (int g = 0; g < 4; ++g)                                          \
            part[((threadIdx.y * ROWS + r) * 4 + g) * 32 + threadIdx.x] = acc[r][g];           \
    __syncthreads();                                                                           \
    if (j >= H) return;                                                                        \
    /* Each (row, gate) pair is summed over the KS slices by one thread. */                    \
    for (int r = threadIdx.y; r < nrows; r += KS) {                                            \
        float s[4];                                                                            \
        const float* g_row = gx + (long)(b0 + r) * gx_rs;                                      \
        _Pragma("unroll") for (int g = 0; g < 4; ++g) {                                        \
            float v = g_row[g * H + j] + bias[g * H + j];                                      \
            _Pragma("unroll") for (int ks = 0; ks < KS; ++ks)                                  \
                v += part[((ks * ROWS + r) * 4 + g) * 32 + threadIdx.x];                       \
            s[g] = v;                                                                          \
        }                                                                                      \
        float ig = sigmoid_f(s[0]), og = sigmoid_f(s[1]);                                      \
        float fg = sigmoid_f(s[2]), gg = tanhf(s[3]);                                          \
        long ci = (long)(b0 + r) * H + j;                                                      \
        float cell = first ? ig * gg : fmaf(fg, c[ci], ig * gg);                               \
        c[ci] = cell;                                                                          \
        hn[(long)(b0 + r) * hn_rs + j] = og * tanhf(cell);                                     \
    }                                                                                          \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
LSTM_STEP_KERNEL(lstm_step_f32_wide, float, LOAD_F32, 8, 4)
LSTM_STEP_KERNEL(lstm_step_bf16_wide, bf16_t, LOAD_BF16, 8, 4)
LSTM_STEP_KERNEL(lstm_step_f32_narrow, float, LOAD_F32, 2, 8)
LSTM_STEP_KERNEL(lstm_step_bf16_narrow, bf16_t, LOAD_BF16, 2, 8)

// The cell update alone, after cuBLAS has added h_prev · R to the step's
// gx (large batches: the recurrent product on tensor cores). Writes a
// bf16 copy of h for the next step's bf16 GEMM when `hlow` is not null.
extern "C" __global__ void lstm_cell(const float* __restrict__ gx, long gx_rs,
                                     const float* __restrict__ bias, float* __restrict__ c,
                                     float* __restrict__ hn, long hn_rs,
                                     bf16_t* __restrict__ hlow, int B, int H, int first) {
    long total = (long)B * H;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total;
         idx += (long)gridDim.x * blockDim.x) {
        long b = idx / H;
        int j = (int)(idx - b * H);
        const float* g = gx + b * gx_rs;
        float ig = sigmoid_f(g[j] + bias[j]);
        float og = sigmoid_f(g[H + j] + bias[H + j]);
        float fg = sigmoid_f(g[2 * H + j] + bias[2 * H + j]);
        float gg = tanhf(g[3 * H + j] + bias[3 * H + j]);
        float cell = first ? ig * gg : fmaf(fg, c[idx], ig * gg);
        c[idx] = cell;
        float h = og * tanhf(cell);
        hn[b * hn_rs + j] = h;
        if (hlow) hlow[idx] = f32_to_bf16(h);
    }
}
