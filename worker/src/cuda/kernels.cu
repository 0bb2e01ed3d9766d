// Fused kernels compiled at run time with NVRTC (see kernels.rs). No CUDA headers are
// needed: bf16 values travel as their 16-bit patterns and are converted by hand (round to
// nearest even, as torch does).

typedef unsigned short bf16;

// -inf without <math.h>.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f(bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ bf16 f_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// AdamW over a flat fp32 partition (master weights p, moments m and v) with gradient g
// scaled by gscale (the clipping factor), decoupled weight decay on [0, decay_end), and,
// if out is not null, the updated weights rounded to bf16 into out (the model's copy).
// One pass over memory instead of the nine of the unfused update plus copy.
#define ADAMW_BODY(LOAD_G)                                                                  \
    long long stride = (long long)blockDim.x * gridDim.x;                                   \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) { \
        float gi = (LOAD_G) * gscale;                                                       \
        float mi = b1 * m[i] + (1.f - b1) * gi;                                             \
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;                                        \
        float pi = p[i];                                                                    \
        if (i < decay_end) pi *= decay;                                                     \
        pi -= step_size * mi / (sqrtf(vi) * inv_bias2_sqrt + eps);                          \
        m[i] = mi;                                                                          \
        v[i] = vi;                                                                          \
        p[i] = pi;                                                                          \
        if (out) out[i] = f_to_bf16(pi);                                                    \
    }

extern "C" __global__ void adamw_g32(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ g, bf16* __restrict__ out, long long n,
                                     long long decay_end, float decay, float b1, float b2, float eps,
                                     float step_size, float inv_bias2_sqrt, float gscale) {
    ADAMW_BODY(g[i])
}

extern "C" __global__ void adamw_g16(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                     const bf16* __restrict__ g, bf16* __restrict__ out, long long n,
                                     long long decay_end, float decay, float b1, float b2, float eps,
                                     float step_size, float inv_bias2_sqrt, float gscale) {
    ADAMW_BODY(bf16_to_f(g[i]))
}

// Online (max, sum of exp) pairs, combined.
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Cross-entropy, pass 1: one block (256 threads) per row of bf16 logits [rows, V]: the
// row's log-sum-exp in fp32 and the target's log-probability.
extern "C" __global__ void ce_row_stats(const bf16* __restrict__ logits, const long long* __restrict__ targets,
                                        float* __restrict__ lse_out, float* __restrict__ logp_out, int V) {
    const bf16* row = logits + (long long)blockIdx.x * V;
    float m = NEG_INF, s = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = bf16_to_f(row[j]);
        if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        lse_combine(m, s, m2, s2);
    }
    __shared__ float ms[32], ss[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { ms[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        m = lane < warps ? ms[lane] : NEG_INF;
        s = lane < warps ? ss[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off);
            float s2 = __shfl_xor_sync(0xffffffffu, s, off);
            lse_combine(m, s, m2, s2);
        }
        if (lane == 0) {
            float lse = m + logf(s);
            lse_out[blockIdx.x] = lse;
            logp_out[blockIdx.x] = bf16_to_f(row[targets[blockIdx.x]]) - lse;
        }
    }
}

// Cross-entropy, pass 2, in place: logits[r, j] becomes the gradient
// coef[r] * (softmax[r, j] - [j == target[r]]) in bf16. Grid: (column blocks, rows).
extern "C" __global__ void ce_grad(bf16* __restrict__ logits, const long long* __restrict__ targets,
                                   const float* __restrict__ lse, const float* __restrict__ coef, int V) {
    long long r = blockIdx.y;
    bf16* row = logits + r * V;
    float l = lse[r], c = coef[r];
    long long t = targets[r];
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < V; j += blockDim.x * gridDim.x) {
        float p = expf(bf16_to_f(row[j]) - l);
        row[j] = f_to_bf16(c * (p - (j == t ? 1.f : 0.f)));
    }
}

// ---------------------------------------------------------------------------------------
// The elementwise pieces of a decoder block and their backward (see trainer/block.rs):
// RMSNorm, RoPE, SwiGLU. Each replaces several ATen kernels (and autograd's bookkeeping)
// with one pass over memory, computing in fp32 and rounding once to bf16. Pairs of bf16
// travel as one 32-bit word (every row length here is even; the Rust side checks).

__device__ __forceinline__ float2 load2(const bf16* p) {
    unsigned int w = *(const unsigned int*)p;
    return make_float2(bf16_to_f((bf16)(w & 0xffffu)), bf16_to_f((bf16)(w >> 16)));
}

__device__ __forceinline__ void store2(bf16* p, float a, float b) {
    *(unsigned int*)p = (unsigned int)f_to_bf16(a) | ((unsigned int)f_to_bf16(b) << 16);
}

// Sum of one float per thread over the block (blockDim.x a multiple of 32); every thread
// gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // an earlier call's readers are done with part
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// RMSNorm forward, one block per row of x [rows, D]: y = x * rstd * w, rstd = 1/sqrt(mean(x²)
// + eps) (kept for backward), as ATen's fused rms_norm computes it.
extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y,
                                       float* __restrict__ rstd, int D, float eps) {
    long long r = blockIdx.x;
    const bf16* xr = x + r * D;
    bf16* yr = y + r * D;
    float ss = 0.f;
    for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) {
        float2 v = load2(xr + j);
        ss += v.x * v.x + v.y * v.y;
    }
    float rs = rsqrtf(block_sum(ss) / D + eps);
    for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) {
        float2 v = load2(xr + j), g = load2(w + j);
        store2(yr + j, v.x * rs * g.x, v.y * rs * g.y);
    }
    if (threadIdx.x == 0) rstd[r] = rs;
}

// RMSNorm backward over rows r = blockIdx.x, blockIdx.x + gridDim.x, ...:
// dx = rstd·(dy·w) − x·rstd³·mean(dy·w·x) (+ residual, the gradient arriving through the
// skip connection), and this block's share of dw = Σ_rows dy·x·rstd into dw_part[blockIdx.x]
// (fp32 [gridDim.x, D], summed by the caller). Shared memory: D floats. Each thread owns the
// same columns in every loop, so the accumulators need no atomics or barriers.
extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                       const bf16* __restrict__ residual, bf16* __restrict__ dx,
                                       float* __restrict__ dw_part, long long rows, int D) {
    extern __shared__ float dw_acc[];
    for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) dw_acc[j] = dw_acc[j + 1] = 0.f;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* xr = x + r * D;
        const bf16* dyr = dy + r * D;
        float rs = rstd[r], dot = 0.f;
        for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) {
            float2 v = load2(xr + j), d = load2(dyr + j), g = load2(w + j);
            dot += d.x * g.x * v.x + d.y * g.y * v.y;
            dw_acc[j] += d.x * v.x * rs;
            dw_acc[j + 1] += d.y * v.y * rs;
        }
        float c = rs * rs * rs * block_sum(dot) / D;
        for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) {
            float2 v = load2(xr + j), d = load2(dyr + j), g = load2(w + j);
            float a = rs * d.x * g.x - v.x * c, b = rs * d.y * g.y - v.y * c;
            if (residual) {
                float2 s = load2(residual + r * D + j);
                a += s.x;
                b += s.y;
            }
            store2(dx + r * D + j, a, b);
        }
    }
    for (int j = 2 * threadIdx.x; j < D; j += 2 * blockDim.x) {
        dw_part[(long long)blockIdx.x * D + j] = dw_acc[j];
        dw_part[(long long)blockIdx.x * D + j + 1] = dw_acc[j + 1];
    }
}

// RoPE (rotate-half) in place on the first rot_heads heads of each row of qkv [rows, W]
// (row r = b·T + t; its position is positions[r], or t without positions). cos and ssin are
// the model's tables [max_pos, hd]: cos repeated over both halves, ssin = [−sin, sin].
// Positions are clamped to the tables (the batch builder never exceeds them; a bad one must
// not read out of bounds).
// (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin).
extern "C" __global__ void rope_fwd(bf16* __restrict__ qkv, const bf16* __restrict__ cos,
                                    const bf16* __restrict__ ssin, const long long* __restrict__ positions,
                                    long long rows, int T, int W, int rot_heads, int hd, int max_pos) {
    int half = hd / 2;
    long long n = rows * rot_heads * half;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        int c = (int)(i % half);
        long long rest = i / half;
        int head = (int)(rest % rot_heads);
        long long r = rest / rot_heads;
        long long pos = positions ? min(max(positions[r], 0LL), (long long)max_pos - 1) : r % T;
        float co = bf16_to_f(cos[pos * hd + c]), si = bf16_to_f(ssin[pos * hd + half + c]);
        bf16* p = qkv + r * W + (long long)head * hd;
        float x1 = bf16_to_f(p[c]), x2 = bf16_to_f(p[c + half]);
        p[c] = f_to_bf16(x1 * co - x2 * si);
        p[c + half] = f_to_bf16(x2 * co + x1 * si);
    }
}

// RoPE backward fused with packing the attention's input gradients into the layout of the
// qkv projection's output: dq [B, H, T, hd], dk and dv [B, K, T, hd] (any strides; the last
// dimension contiguous) → out [B·T, (H + 2K)·hd], q and k heads rotated back:
// (d1, d2) → (d1·cos + d2·sin, d2·cos − d1·sin); v heads copied.
extern "C" __global__ void rope_bwd_pack(const bf16* __restrict__ dq, const bf16* __restrict__ dk,
                                         const bf16* __restrict__ dv, long long qb, long long qh, long long qt,
                                         long long kb, long long kh, long long kt, long long vb, long long vh,
                                         long long vt, const bf16* __restrict__ cos, const bf16* __restrict__ ssin,
                                         const long long* __restrict__ positions, bf16* __restrict__ out,
                                         long long rows, int T, int H, int K, int hd, int max_pos) {
    int half = hd / 2, heads = H + 2 * K;
    long long W = (long long)heads * hd;
    long long n = rows * heads * half;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        int c = (int)(i % half);
        long long rest = i / half;
        int head = (int)(rest % heads);
        long long r = rest / heads;
        long long b = r / T, t = r % T;
        const bf16* src;
        if (head < H) src = dq + b * qb + head * qh + t * qt;
        else if (head < H + K) src = dk + b * kb + (head - H) * kh + t * kt;
        else src = dv + b * vb + (head - H - K) * vh + t * vt;
        bf16* dst = out + r * W + (long long)head * hd;
        if (head < H + K) {
            long long pos = positions ? min(max(positions[r], 0LL), (long long)max_pos - 1) : t;
            float co = bf16_to_f(cos[pos * hd + c]), si = bf16_to_f(ssin[pos * hd + half + c]);
            float d1 = bf16_to_f(src[c]), d2 = bf16_to_f(src[c + half]);
            dst[c] = f_to_bf16(d1 * co + d2 * si);
            dst[c + half] = f_to_bf16(d2 * co - d1 * si);
        } else {
            dst[c] = src[c];
            dst[c + half] = src[c + half];
        }
    }
}

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

// SwiGLU forward: gu [rows, 2F] holds gate then up; a [rows, F] = silu(gate) · up.
extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ gu, bf16* __restrict__ a, long long rows, int F) {
    long long pairs = rows * (F / 2);
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < pairs; i += stride) {
        long long r = i / (F / 2);
        int j = (int)(i % (F / 2)) * 2;
        const bf16* row = gu + r * 2 * F;
        float2 g = load2(row + j), u = load2(row + F + j);
        store2(a + r * F + j, g.x * sigmoid_f(g.x) * u.x, g.y * sigmoid_f(g.y) * u.y);
    }
}

// SwiGLU backward: given da [rows, F], dgu [rows, 2F] = (da · up · silu'(gate), da · silu(gate))
// with silu'(g) = s·(1 + g·(1 − s)), s = sigmoid(g).
extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ gu, const bf16* __restrict__ da,
                                      bf16* __restrict__ dgu, long long rows, int F) {
    long long pairs = rows * (F / 2);
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < pairs; i += stride) {
        long long r = i / (F / 2);
        int j = (int)(i % (F / 2)) * 2;
        const bf16* row = gu + r * 2 * F;
        float2 g = load2(row + j), u = load2(row + F + j), d = load2(da + r * F + j);
        float sx = sigmoid_f(g.x), sy = sigmoid_f(g.y);
        bf16* out = dgu + r * 2 * F;
        store2(out + j, d.x * u.x * sx * (1.f + g.x * (1.f - sx)), d.y * u.y * sy * (1.f + g.y * (1.f - sy)));
        store2(out + F + j, d.x * g.x * sx, d.y * g.y * sy);
    }
}
