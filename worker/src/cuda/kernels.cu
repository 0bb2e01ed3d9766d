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
