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

// bf16 values two or four to a 32- or 64-bit word.
__device__ __forceinline__ float lo_f(unsigned int w) { return bf16_to_f((bf16)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f(unsigned int w) { return bf16_to_f((bf16)(w >> 16)); }
__device__ __forceinline__ unsigned int pack2(float a, float b) {
    return (unsigned int)f_to_bf16(a) | ((unsigned int)f_to_bf16(b) << 16);
}

__device__ __forceinline__ float2 load2(const bf16* p) {
    unsigned int w = *(const unsigned int*)p;
    return make_float2(lo_f(w), hi_f(w));
}

__device__ __forceinline__ void store2(bf16* p, float a, float b) { *(unsigned int*)p = pack2(a, b); }

__device__ __forceinline__ float4 load4(const bf16* p) {
    uint2 w = *(const uint2*)p;
    return make_float4(lo_f(w.x), hi_f(w.x), lo_f(w.y), hi_f(w.y));
}

__device__ __forceinline__ void store4(bf16* p, float a, float b, float c, float d) {
    uint2 w;
    w.x = pack2(a, b);
    w.y = pack2(c, d);
    *(uint2*)p = w;
}

// AdamW over a flat fp32 partition (master weights p, moments m and v) with gradient g
// scaled by gscale (the clipping factor), decoupled weight decay on [0, decay_end), and,
// if out is not null, the updated weights rounded to bf16 into out (the model's copy).
// One pass over memory instead of the nine of the unfused update plus copy, four elements
// per thread and load where every pointer is aligned for it.
struct AdamWScalars {
    float decay, b1, b2, eps, step_size, inv_bias2_sqrt, gscale;
};

__device__ __forceinline__ void adamw_one(float& p, float& m, float& v, float g_raw, bool decayed, const AdamWScalars& a) {
    float g = g_raw * a.gscale;
    m = a.b1 * m + (1.f - a.b1) * g;
    v = a.b2 * v + (1.f - a.b2) * g * g;
    if (decayed) p *= a.decay;
    p -= a.step_size * m / (sqrtf(v) * a.inv_bias2_sqrt + a.eps);
}

template <bool G16>
__device__ void adamw_impl(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, const void* g_ptr,
                           bf16* __restrict__ out, long long n, long long decay_end, const AdamWScalars& a) {
    long long stride = (long long)blockDim.x * gridDim.x;
    long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const float* g32 = (const float*)g_ptr;
    const bf16* g16 = (const bf16*)g_ptr;
    unsigned long long fp32_bits = (unsigned long long)p | (unsigned long long)m | (unsigned long long)v |
                                   (G16 ? 0ull : (unsigned long long)g_ptr);
    unsigned long long bf16_bits = (G16 ? (unsigned long long)g_ptr : 0ull) | (unsigned long long)out;
    long long done = 0;
    if ((fp32_bits & 15) == 0 && (bf16_bits & 7) == 0) {
        long long quads = n / 4;
        for (long long q = first; q < quads; q += stride) {
            long long i = 4 * q;
            float4 P = ((float4*)p)[q], M = ((float4*)m)[q], V = ((float4*)v)[q];
            float4 G = G16 ? load4(g16 + i) : ((const float4*)g32)[q];
            adamw_one(P.x, M.x, V.x, G.x, i < decay_end, a);
            adamw_one(P.y, M.y, V.y, G.y, i + 1 < decay_end, a);
            adamw_one(P.z, M.z, V.z, G.z, i + 2 < decay_end, a);
            adamw_one(P.w, M.w, V.w, G.w, i + 3 < decay_end, a);
            ((float4*)p)[q] = P;
            ((float4*)m)[q] = M;
            ((float4*)v)[q] = V;
            if (out) store4(out + i, P.x, P.y, P.z, P.w);
        }
        done = quads * 4;
    }
    for (long long i = done + first; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_one(pi, mi, vi, G16 ? bf16_to_f(g16[i]) : g32[i], i < decay_end, a);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (out) out[i] = f_to_bf16(pi);
    }
}

extern "C" __global__ void adamw_g32(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ g, bf16* __restrict__ out, long long n,
                                     long long decay_end, float decay, float b1, float b2, float eps,
                                     float step_size, float inv_bias2_sqrt, float gscale) {
    AdamWScalars a = {decay, b1, b2, eps, step_size, inv_bias2_sqrt, gscale};
    adamw_impl<false>(p, m, v, g, out, n, decay_end, a);
}

extern "C" __global__ void adamw_g16(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                     const bf16* __restrict__ g, bf16* __restrict__ out, long long n,
                                     long long decay_end, float decay, float b1, float b2, float eps,
                                     float step_size, float inv_bias2_sqrt, float gscale) {
    AdamWScalars a = {decay, b1, b2, eps, step_size, inv_bias2_sqrt, gscale};
    adamw_impl<true>(p, m, v, g, out, n, decay_end, a);
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
// with one pass over memory, computing in fp32 and rounding once to bf16. Values travel
// two or four bf16 to a 32- or 64-bit word, and every kernel that walks rows runs one
// block per row, so no thread divides 64-bit indices (the Rust side checks the row lengths
// and alignments this needs).

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

// RMSNorm rows are held in registers: each thread takes up to NORM_QUADS groups of four
// columns, j = 4·(threadIdx.x + k·blockDim.x), so blockDim.x ≥ D / (4·NORM_QUADS).
#define NORM_QUADS 4

// RMSNorm forward, one block per row of x [rows, D]: y = x · rstd · w, rstd = 1/sqrt(mean(x²)
// + eps) (kept for backward), as ATen's fused rms_norm computes it.
extern "C" __global__ void rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y,
                                       float* __restrict__ rstd, int D, float eps) {
    long long r = blockIdx.x;
    const bf16* xr = x + r * D;
    float4 v[NORM_QUADS];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_QUADS; k++) {
        int j = 4 * (threadIdx.x + k * blockDim.x);
        v[k] = j < D ? load4(xr + j) : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    }
    float rs = rsqrtf(block_sum(ss) / D + eps);
#pragma unroll
    for (int k = 0; k < NORM_QUADS; k++) {
        int j = 4 * (threadIdx.x + k * blockDim.x);
        if (j < D) {
            float4 g = load4(w + j);
            store4(y + r * D + j, v[k].x * rs * g.x, v[k].y * rs * g.y, v[k].z * rs * g.z, v[k].w * rs * g.w);
        }
    }
    if (threadIdx.x == 0) rstd[r] = rs;
}

// RMSNorm backward over rows r = blockIdx.x, blockIdx.x + gridDim.x, ...:
// dx = rstd·(dy·w) − x·rstd³·mean(dy·w·x) (+ residual, the gradient arriving through the
// skip connection), and this block's share of dw = Σ_rows dy·x·rstd into dw_part[blockIdx.x]
// (fp32 [gridDim.x, D], summed by the caller). A thread owns the same columns in every row,
// so its share of dw stays in registers.
extern "C" __global__ void rmsnorm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                       const float* __restrict__ rstd, const bf16* __restrict__ dy,
                                       const bf16* __restrict__ residual, bf16* __restrict__ dx,
                                       float* __restrict__ dw_part, long long rows, int D) {
    float4 g[NORM_QUADS], acc[NORM_QUADS];
#pragma unroll
    for (int k = 0; k < NORM_QUADS; k++) {
        int j = 4 * (threadIdx.x + k * blockDim.x);
        g[k] = j < D ? load4(w + j) : make_float4(0.f, 0.f, 0.f, 0.f);
        acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* xr = x + r * D;
        const bf16* dyr = dy + r * D;
        float rs = rstd[r], dot = 0.f;
        float4 v[NORM_QUADS], d[NORM_QUADS];
#pragma unroll
        for (int k = 0; k < NORM_QUADS; k++) {
            int j = 4 * (threadIdx.x + k * blockDim.x);
            v[k] = j < D ? load4(xr + j) : make_float4(0.f, 0.f, 0.f, 0.f);
            d[k] = j < D ? load4(dyr + j) : make_float4(0.f, 0.f, 0.f, 0.f);
            dot += d[k].x * g[k].x * v[k].x + d[k].y * g[k].y * v[k].y + d[k].z * g[k].z * v[k].z +
                   d[k].w * g[k].w * v[k].w;
            acc[k].x += d[k].x * v[k].x * rs;
            acc[k].y += d[k].y * v[k].y * rs;
            acc[k].z += d[k].z * v[k].z * rs;
            acc[k].w += d[k].w * v[k].w * rs;
        }
        float c = rs * rs * rs * block_sum(dot) / D;
#pragma unroll
        for (int k = 0; k < NORM_QUADS; k++) {
            int j = 4 * (threadIdx.x + k * blockDim.x);
            if (j < D) {
                float a0 = rs * d[k].x * g[k].x - v[k].x * c, a1 = rs * d[k].y * g[k].y - v[k].y * c;
                float a2 = rs * d[k].z * g[k].z - v[k].z * c, a3 = rs * d[k].w * g[k].w - v[k].w * c;
                if (residual) {
                    float4 s = load4(residual + r * D + j);
                    a0 += s.x;
                    a1 += s.y;
                    a2 += s.z;
                    a3 += s.w;
                }
                store4(dx + r * D + j, a0, a1, a2, a3);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < NORM_QUADS; k++) {
        int j = 4 * (threadIdx.x + k * blockDim.x);
        if (j < D) *(float4*)(dw_part + (long long)blockIdx.x * D + j) = acc[k];
    }
}

// RoPE (rotate-half) in place on the first rot_heads heads of row blockIdx.x of qkv
// [rows, W] (row r = b·T + t; its position is positions[r], or t without positions). cos
// and ssin are the model's tables [max_pos, hd]: cos repeated over both halves, ssin =
// [−sin, sin]. (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin), two columns per thread.
// Positions are clamped to the tables (the batch builder never exceeds them; a bad one must
// not read out of bounds).
extern "C" __global__ void rope_fwd(bf16* __restrict__ qkv, const bf16* __restrict__ cos,
                                    const bf16* __restrict__ ssin, const long long* __restrict__ positions, int T,
                                    int W, int rot_heads, int hd, int max_pos) {
    long long r = blockIdx.x;
    long long pos = positions ? min(max(positions[r], 0LL), (long long)max_pos - 1) : r % T;
    int half = hd / 2, pairs = half / 2;
    const bf16* cr = cos + pos * hd;
    const bf16* sr = ssin + pos * hd + half;
    bf16* row = qkv + r * W;
    for (int i = threadIdx.x; i < rot_heads * pairs; i += blockDim.x) {
        int head = i / pairs, c = 2 * (i - head * pairs);
        bf16* p = row + head * hd;
        float2 co = load2(cr + c), si = load2(sr + c), x1 = load2(p + c), x2 = load2(p + c + half);
        store2(p + c, x1.x * co.x - x2.x * si.x, x1.y * co.y - x2.y * si.y);
        store2(p + c + half, x2.x * co.x + x1.x * si.x, x2.y * co.y + x1.y * si.y);
    }
}

// RoPE backward fused with packing the attention's input gradients into the layout of the
// qkv projection's output, one block per row r = b·T + t: dq [B, H, T, hd], dk and dv
// [B, K, T, hd] (any strides; the last dimension contiguous) → out [B·T, (H + 2K)·hd], q
// and k heads rotated back: (d1, d2) → (d1·cos + d2·sin, d2·cos − d1·sin); v heads copied.
extern "C" __global__ void rope_bwd_pack(const bf16* __restrict__ dq, const bf16* __restrict__ dk,
                                         const bf16* __restrict__ dv, long long qb, long long qh, long long qt,
                                         long long kb, long long kh, long long kt, long long vb, long long vh,
                                         long long vt, const bf16* __restrict__ cos, const bf16* __restrict__ ssin,
                                         const long long* __restrict__ positions, bf16* __restrict__ out, int T, int H,
                                         int K, int hd, int max_pos) {
    long long r = blockIdx.x, b = r / T, t = r % T;
    long long pos = positions ? min(max(positions[r], 0LL), (long long)max_pos - 1) : t;
    int half = hd / 2, pairs = half / 2, heads = H + 2 * K;
    const bf16* cr = cos + pos * hd;
    const bf16* sr = ssin + pos * hd + half;
    const bf16* q_row = dq + b * qb + t * qt;
    const bf16* k_row = dk + b * kb + t * kt;
    const bf16* v_row = dv + b * vb + t * vt;
    bf16* row = out + r * (long long)heads * hd;
    for (int i = threadIdx.x; i < heads * pairs; i += blockDim.x) {
        int head = i / pairs, c = 2 * (i - head * pairs);
        const bf16* src = head < H ? q_row + head * qh : head < H + K ? k_row + (head - H) * kh : v_row + (head - H - K) * vh;
        bf16* dst = row + head * hd;
        if (head < H + K) {
            float2 co = load2(cr + c), si = load2(sr + c), d1 = load2(src + c), d2 = load2(src + c + half);
            store2(dst + c, d1.x * co.x + d2.x * si.x, d1.y * co.y + d2.y * si.y);
            store2(dst + c + half, d2.x * co.x - d1.x * si.x, d2.y * co.y - d1.y * si.y);
        } else {
            *(unsigned int*)(dst + c) = *(const unsigned int*)(src + c);
            *(unsigned int*)(dst + c + half) = *(const unsigned int*)(src + c + half);
        }
    }
}

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

// SwiGLU forward, one block per row: gu [rows, 2F] holds gate then up; a [rows, F] =
// silu(gate) · up. Four columns per thread (F % 4 == 0).
extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ gu, bf16* __restrict__ a, int F) {
    long long r = blockIdx.x;
    const bf16* row = gu + r * 2 * F;
    for (int j = 4 * threadIdx.x; j < F; j += 4 * blockDim.x) {
        float4 g = load4(row + j), u = load4(row + F + j);
        store4(a + r * F + j, g.x * sigmoid_f(g.x) * u.x, g.y * sigmoid_f(g.y) * u.y, g.z * sigmoid_f(g.z) * u.z,
               g.w * sigmoid_f(g.w) * u.w);
    }
}

__device__ __forceinline__ float dsilu_times(float d, float g, float u, float s) { return d * u * s * (1.f + g * (1.f - s)); }

// SwiGLU backward, one block per row: given da [rows, F], dgu [rows, 2F] = (da · up ·
// silu'(gate), da · silu(gate)) with silu'(g) = s·(1 + g·(1 − s)), s = sigmoid(g).
extern "C" __global__ void swiglu_bwd(const bf16* __restrict__ gu, const bf16* __restrict__ da,
                                      bf16* __restrict__ dgu, int F) {
    long long r = blockIdx.x;
    const bf16* row = gu + r * 2 * F;
    bf16* out = dgu + r * 2 * F;
    for (int j = 4 * threadIdx.x; j < F; j += 4 * blockDim.x) {
        float4 g = load4(row + j), u = load4(row + F + j), d = load4(da + r * F + j);
        float sx = sigmoid_f(g.x), sy = sigmoid_f(g.y), sz = sigmoid_f(g.z), sw = sigmoid_f(g.w);
        store4(out + j, dsilu_times(d.x, g.x, u.x, sx), dsilu_times(d.y, g.y, u.y, sy), dsilu_times(d.z, g.z, u.z, sz),
               dsilu_times(d.w, g.w, u.w, sw));
        store4(out + F + j, d.x * g.x * sx, d.y * g.y * sy, d.z * g.z * sz, d.w * g.w * sw);
    }
}
