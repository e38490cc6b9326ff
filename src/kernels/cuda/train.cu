// Kernels of the training engine's CUDA ops (src/engine/train.rs: the pretraining step's forward
// and backward). The products are cuBLASLt's; these are the small ops between them and
// attention with its backward, each the twin of a host kernel in src/kernels/cpu_train.rs or
// src/engine/host_train.rs. Values are f32, or bf16 (stored as its bits, `bf16_t`; computed on
// in f32, rounded to nearest even once when stored) where a kernel's name ends in _bf16: the
// activations of a bf16 step (LayerNorm outputs, qkv, attention, the MLP, and the gradients of
// attention and the MLP). Statistics, log-sum-exps, weight gradients and the residual stream
// stay f32 in every precision.
//
// Compiled at run time by NVRTC with `--gpu-architecture=sm_XY --std=c++17` (no fast math). No
// header, sm_70 and newer (atomicAdd on double needs sm_60). All flat indices are 64-bit.
//
// Kernels and launch configurations (the Rust side launches exactly these):
//   fill_f32 (x, n, value)                                 256 threads, any 1-D grid (grid-stride)
//   fill_bf16 (x, n, value)                                the same, value rounded to bf16
//   convert_f32_bf16 (x, y, n) / convert_bf16_f32 (x, y, n)  y = x in the other type; as fill
//   gather_rows_f32 (src, src_per_batch, src_start, idx, dst, dst_per_batch, dst_start,
//                    batch, count, width, accumulate)
//       dst row (b*dst_per_batch + dst_start + j) (+)= src row (b*src_per_batch + src_start +
//       (idx ? idx[b*count + j] : j)); src_per_batch 0: one block of rows shared by all batches.
//       One block per destination row: grid = batch*count, 128 threads.
//   scatter_add_rows_f32 (same arguments)
//       the gather's backward: src row (...) += dst row (...), by atomicAdd (rows of a shared
//       source collect every batch's). Launch as gather_rows_f32.
//   col_sum_f32 / col_sum_bf16 (src, rows, width, col0, cols, dst; dst f32)
//       dst[c] += sum over r of src[r*width + col0 + c]. grid = (ceil(cols/256), splits), 256
//       threads; block y sums rows y, y+splits, ... of its columns, then one atomicAdd per column.
//   layer_norm_fwd_f32 / layer_norm_fwd_bf16 (x, gamma, beta, y, stats, rows, d, eps; only y bf16)
//       y = LayerNorm(x) per row (biased variance, eps inside the sqrt, two passes), stats[r] =
//       (mean, 1/sigma). One warp per row, 256 threads (8 rows), grid = ceil(rows/8).
//   layer_norm_bwd_f32 (x, stats, gamma, dy, dx, dgamma, dbeta, rows, d)
//       dx += rstd*(dy*gamma - mean(dy*gamma) - xhat*mean(dy*gamma*xhat)); dgamma += sum dy*xhat,
//       dbeta += sum dy over the rows. One warp per row, 256 threads (8 rows), grid =
//       ceil(rows/8), dynamic shared memory 2*d floats (the block's partial dgamma, dbeta, added
//       with one atomicAdd per column and block).
//   gelu_fwd_f32 (x, y, n) / gelu_bwd_f32 (x, g, n), and _bf16 (x, y, g bf16)
//       y = exact GELU(x); g *= Phi(x) + x*phi(x). 256 threads, any grid (grid-stride).
//   leaky_relu_f32 (x, y, n, slope) / leaky_relu_bwd_f32 (x, g, n, slope)
//       y = x > 0 ? x : slope*x; g *= (x > 0 ? 1 : slope). 256 threads, any grid.
//   sq_diff_sum_f32 (pred, target, dpred, n, grad_scale, acc)
//       *acc (double) += sum (pred - target)^2; with dpred (not null), dpred = grad_scale *
//       (pred - target). 256 threads, any grid; *acc zeroed by the caller.
//   sum_f32 (x, n, acc)                                    *acc (double) += sum x; as above
//   store_scaled_f32 (acc, out, scale)                     out[0] = (float)(*acc * scale); 1 thread
//   adamw_f32 (p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, c1, c2)
//       m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p = p*(1 - lr*wd) - lr*(m/c1)/(sqrt(v/c2) +
//       eps), with c1 = 1 - b1^t, c2 = 1 - b2^t. 256 threads, any grid.
//
// Attention on CUDA cores (f32 arithmetic; the f32 parity path, and bf16's where cuDNN's fused
// attention is missing): qkv [B*n, 3*h*hd] rows of (q | k | v), each h heads of hd; out
// [B*n, h*hd]; lse [B, h, n] (f32) the log-sum-exps of the scaled scores. HD in the names is the
// register width (32, 64 or 128), any hd <= HD; each kernel also as _bf16_hdHD (qkv, out, dout,
// dqkv bf16), attention_delta as attention_delta_bf16 (out, dout bf16).
//   attention_fwd_f32_hdHD (qkv, out, lse, n, h, hd, scale)
//       one thread per query, online softmax over key tiles of 32 in shared memory. grid =
//       (ceil(n/128), B*h), 128 threads.
//   attention_delta_f32 (out, dout, delta, rows, h, hd)
//       delta[(b*h + j)*n + i] = sum_d out*dout of row b*n+i, head j; rows = B*n. One thread per
//       (row, head), grid-stride: grid = ceil(rows*h/256) (capped), 256 threads.
//   attention_bwd_dq_f32_hdHD (qkv, dout, lse, delta, dqkv, n, h, hd, scale)
//       dq = scale * sum_j P_ij (dP_ij - delta_i) k_j into dqkv's q columns (overwritten); one
//       thread per query, key tiles in shared memory. grid = (ceil(n/64), B*h), 64 threads.
//   attention_bwd_dkv_f32_hdHD (qkv, dout, lse, delta, dqkv, n, h, hd, scale)
//       dv = sum_i P_ij dO_i, dk = scale * sum_i P_ij (dP_ij - delta_i) q_i into dqkv's k and v
//       columns (overwritten); one thread per key, query tiles in shared memory. Launch as dq.

typedef unsigned short bf16_t;

namespace {

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// bf16 as its bits; f32 -> bf16 rounds to nearest even (encoder.cu's conversion, the host
// twin's kernels::bf16::to_bf16).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// Loads and stores of f32 or bf16 values, computed on in f32.
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024) into one atomicAdd.
__device__ __forceinline__ void block_add_to(double v, double* acc) {
    __shared__ double part[32];
    v = warp_sum_d(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        double s = lane < warps ? part[lane] : 0.0;
        s = warp_sum_d(s);
        if (lane == 0) atomicAdd(acc, s);
    }
}

__device__ __forceinline__ long long src_row(long long b, long long per_batch, long long start,
                                             long long j) {
    return b * per_batch + start + j;
}

}  // namespace

extern "C" __global__ void fill_f32(float* x, long long n, float value) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" __global__ void fill_bf16(bf16_t* x, long long n, float value) {
    const bf16_t v = f32_to_bf16(value);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = v;
}

extern "C" __global__ void convert_f32_bf16(const float* x, bf16_t* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void convert_bf16_f32(const bf16_t* x, float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void gather_rows_f32(const float* src, long long src_per_batch,
                                           long long src_start, const unsigned int* idx,
                                           float* dst, long long dst_per_batch,
                                           long long dst_start, int batch, int count, int width,
                                           int accumulate) {
    const long long row = blockIdx.x;  // b * count + j
    if (row >= (long long)batch * count) return;
    const long long b = row / count, j = row % count;
    const long long from = idx ? (long long)idx[row] : j;
    const float* s = src + src_row(b, src_per_batch, src_start, from) * width;
    float* d = dst + src_row(b, dst_per_batch, dst_start, j) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) d[c] = accumulate ? d[c] + s[c] : s[c];
}

extern "C" __global__ void scatter_add_rows_f32(float* src, long long src_per_batch,
                                                long long src_start, const unsigned int* idx,
                                                const float* dst, long long dst_per_batch,
                                                long long dst_start, int batch, int count,
                                                int width, int accumulate) {
    (void)accumulate;
    const long long row = blockIdx.x;
    if (row >= (long long)batch * count) return;
    const long long b = row / count, j = row % count;
    const long long to = idx ? (long long)idx[row] : j;
    float* s = src + src_row(b, src_per_batch, src_start, to) * width;
    const float* d = dst + src_row(b, dst_per_batch, dst_start, j) * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) atomicAdd(s + c, d[c]);
}

template <typename X>
__device__ __forceinline__ void col_sum(const X* src, long long rows, int width, int col0,
                                        int cols, float* dst) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) s += ld(src, r * width + col0 + c);
    atomicAdd(dst + c, s);
}

extern "C" __global__ void col_sum_f32(const float* src, long long rows, int width, int col0,
                                       int cols, float* dst) {
    col_sum(src, rows, width, col0, cols, dst);
}

extern "C" __global__ void col_sum_bf16(const bf16_t* src, long long rows, int width, int col0,
                                        int cols, float* dst) {
    col_sum(src, rows, width, col0, cols, dst);
}

template <typename Y>
__device__ __forceinline__ void layer_norm_fwd(const float* x, const float* gamma,
                                               const float* beta, Y* y, float* stats,
                                               long long rows, int d, float eps) {
    const long long r = blockIdx.x * 8LL + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float* xr = x + r * d;
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += xr[i];
    const float mean = warp_sum(s) / d;
    float q = 0.f;
    for (int i = lane; i < d; i += 32) {
        const float t = xr[i] - mean;
        q += t * t;
    }
    const float rstd = 1.f / sqrtf(warp_sum(q) / d + eps);
    Y* yr = y + r * d;
    for (int i = lane; i < d; i += 32) st(yr, i, (xr[i] - mean) * rstd * gamma[i] + beta[i]);
    if (lane == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

extern "C" __global__ void layer_norm_fwd_f32(const float* x, const float* gamma,
                                              const float* beta, float* y, float* stats,
                                              long long rows, int d, float eps) {
    layer_norm_fwd(x, gamma, beta, y, stats, rows, d, eps);
}

extern "C" __global__ void layer_norm_fwd_bf16(const float* x, const float* gamma,
                                               const float* beta, bf16_t* y, float* stats,
                                               long long rows, int d, float eps) {
    layer_norm_fwd(x, gamma, beta, y, stats, rows, d, eps);
}

extern "C" __global__ void layer_norm_bwd_f32(const float* x, const float* stats,
                                              const float* gamma, const float* dy, float* dx,
                                              float* dgamma, float* dbeta, long long rows, int d) {
    extern __shared__ float part[];  // [2, d]: this block's dgamma, dbeta
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) part[i] = 0.f;
    __syncthreads();
    const long long r = blockIdx.x * 8LL + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r < rows) {
        const float mean = stats[2 * r], rstd = stats[2 * r + 1];
        const float* xr = x + r * d;
        const float* gr = dy + r * d;
        float s1 = 0.f, s2 = 0.f;
        for (int i = lane; i < d; i += 32) {
            const float xh = (xr[i] - mean) * rstd;
            const float g = gr[i] * gamma[i];
            s1 += g;
            s2 += g * xh;
            atomicAdd(part + i, gr[i] * xh);  // shared-memory atomics: 8 rows per block
            atomicAdd(part + d + i, gr[i]);
        }
        const float m1 = warp_sum(s1) / d, m2 = warp_sum(s2) / d;
        float* dr = dx + r * d;
        for (int i = lane; i < d; i += 32) {
            const float xh = (xr[i] - mean) * rstd;
            dr[i] += rstd * (gr[i] * gamma[i] - m1 - xh * m2);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        atomicAdd(dgamma + i, part[i]);
        atomicAdd(dbeta + i, part[d + i]);
    }
}

template <typename X>
__device__ __forceinline__ void gelu_fwd(const X* x, X* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = ld(x, i);
        st(y, i, 0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}

template <typename X>
__device__ __forceinline__ void gelu_bwd(const X* x, X* g, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = ld(x, i);
        const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        st(g, i, ld(g, i) * (cdf + v * pdf));
    }
}

extern "C" __global__ void gelu_fwd_f32(const float* x, float* y, long long n) {
    gelu_fwd(x, y, n);
}

extern "C" __global__ void gelu_bwd_f32(const float* x, float* g, long long n) {
    gelu_bwd(x, g, n);
}

extern "C" __global__ void gelu_fwd_bf16(const bf16_t* x, bf16_t* y, long long n) {
    gelu_fwd(x, y, n);
}

extern "C" __global__ void gelu_bwd_bf16(const bf16_t* x, bf16_t* g, long long n) {
    gelu_bwd(x, g, n);
}

extern "C" __global__ void leaky_relu_f32(const float* x, float* y, long long n, float slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = v > 0.f ? v : v * slope;
    }
}

extern "C" __global__ void leaky_relu_bwd_f32(const float* x, float* g, long long n,
                                              float slope) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        if (!(x[i] > 0.f)) g[i] *= slope;
}

extern "C" __global__ void sq_diff_sum_f32(const float* pred, const float* target, float* dpred,
                                           long long n, float grad_scale, double* acc) {
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float t = pred[i] - target[i];
        s += (double)t * t;
        if (dpred) dpred[i] = grad_scale * t;
    }
    block_add_to(s, acc);
}

extern "C" __global__ void sum_f32(const float* x, long long n, double* acc) {
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s += x[i];
    block_add_to(s, acc);
}

extern "C" __global__ void store_scaled_f32(const double* acc, float* out, double scale) {
    if (blockIdx.x == 0 && threadIdx.x == 0) out[0] = (float)(acc[0] * scale);
}

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, long long n,
                                     float lr, float beta1, float beta2, float eps,
                                     float weight_decay, float c1, float c2) {
    const float decay = 1.f - lr * weight_decay;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
    }
}

// ------------------------------------------------------------------------------------------------
// Attention (f32)
// ------------------------------------------------------------------------------------------------

namespace {

constexpr int TILE = 32;

// Rows of (b, head) in qkv: row i's q, k or v (part 0, 1, 2) of this head.
template <typename X>
__device__ __forceinline__ const X* qkv_at(const X* qkv, long long b, int n, int h, int hd,
                                           int head, int part, long long i) {
    return qkv + (b * n + i) * (3LL * h * hd) + (long long)part * h * hd + (long long)head * hd;
}

template <int HD, typename X>
__device__ __forceinline__ void load_tile(float (*dst)[HD], const X* qkv, long long b, int n,
                                          int h, int hd, int head, int part, int j0) {
    for (int e = threadIdx.x; e < TILE * HD; e += blockDim.x) {
        const int jj = e / HD, d = e % HD, j = j0 + jj;
        dst[jj][d] = (j < n && d < hd) ? ld(qkv_at(qkv, b, n, h, hd, head, part, j), d) : 0.f;
    }
}

template <int HD, typename X>
__device__ void attention_fwd(const X* qkv, X* out, float* lse, int n, int h, int hd,
                              float scale) {
    __shared__ float ks[TILE][HD];
    __shared__ float vs[TILE][HD];
    const long long bh = blockIdx.y, b = bh / h;
    const int head = (int)(bh % h);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < n;
    float q[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        q[d] = (active && d < hd) ? ld(qkv_at(qkv, b, n, h, hd, head, 0, i), d) * scale : 0.f;
        acc[d] = 0.f;
    }
    float m = __int_as_float(0xff800000), l = 0.f;  // -inf
    for (int j0 = 0; j0 < n; j0 += TILE) {
        __syncthreads();
        load_tile<HD>(ks, qkv, b, n, h, hd, head, 1, j0);
        load_tile<HD>(vs, qkv, b, n, h, hd, head, 2, j0);
        __syncthreads();
        if (!active) continue;
        const int cnt = min(TILE, n - j0);
        for (int jj = 0; jj < cnt; ++jj) {
            float s = 0.f;
#pragma unroll
            for (int d = 0; d < HD; ++d) s += q[d] * ks[jj][d];
            const float mn = fmaxf(m, s);
            const float corr = expf(m - mn), p = expf(s - mn);
            l = l * corr + p;
#pragma unroll
            for (int d = 0; d < HD; ++d) acc[d] = acc[d] * corr + p * vs[jj][d];
            m = mn;
        }
    }
    if (!active) return;
    X* o = out + (b * n + i) * (long long)h * hd + (long long)head * hd;
    const float inv = 1.f / l;
#pragma unroll
    for (int d = 0; d < HD; ++d)
        if (d < hd) st(o, d, acc[d] * inv);
    lse[bh * n + i] = m + logf(l);
}

template <int HD, typename X>
__device__ void attention_bwd_dq(const X* qkv, const X* dout, const float* lse,
                                 const float* delta, X* dqkv, int n, int h, int hd,
                                 float scale) {
    __shared__ float ks[TILE][HD];
    __shared__ float vs[TILE][HD];
    const long long bh = blockIdx.y, b = bh / h;
    const int head = (int)(bh % h);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < n;
    const long long orow = (b * n + (active ? i : 0)) * (long long)h * hd + (long long)head * hd;
    float q[HD], g[HD], dq[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        q[d] = (active && d < hd) ? ld(qkv_at(qkv, b, n, h, hd, head, 0, i), d) : 0.f;
        g[d] = (active && d < hd) ? ld(dout, orow + d) : 0.f;
        dq[d] = 0.f;
    }
    const float li = active ? lse[bh * n + i] : 0.f;
    const float di = active ? delta[bh * n + i] : 0.f;
    for (int j0 = 0; j0 < n; j0 += TILE) {
        __syncthreads();
        load_tile<HD>(ks, qkv, b, n, h, hd, head, 1, j0);
        load_tile<HD>(vs, qkv, b, n, h, hd, head, 2, j0);
        __syncthreads();
        if (!active) continue;
        const int cnt = min(TILE, n - j0);
        for (int jj = 0; jj < cnt; ++jj) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int d = 0; d < HD; ++d) {
                s += q[d] * ks[jj][d];
                dp += g[d] * vs[jj][d];
            }
            const float ds = expf(s * scale - li) * (dp - di);
#pragma unroll
            for (int d = 0; d < HD; ++d) dq[d] += ds * ks[jj][d];
        }
    }
    if (!active) return;
    X* o = dqkv + (b * n + i) * (3LL * h * hd) + (long long)head * hd;
#pragma unroll
    for (int d = 0; d < HD; ++d)
        if (d < hd) st(o, d, dq[d] * scale);
}

template <int HD, typename X>
__device__ void attention_bwd_dkv(const X* qkv, const X* dout, const float* lse,
                                  const float* delta, X* dqkv, int n, int h, int hd,
                                  float scale) {
    __shared__ float qs[TILE][HD];
    __shared__ float gs[TILE][HD];
    __shared__ float ls[TILE], ds_[TILE];
    const long long bh = blockIdx.y, b = bh / h;
    const int head = (int)(bh % h);
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = j < n;
    float k[HD], v[HD], dk[HD], dv[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        k[d] = (active && d < hd) ? ld(qkv_at(qkv, b, n, h, hd, head, 1, j), d) : 0.f;
        v[d] = (active && d < hd) ? ld(qkv_at(qkv, b, n, h, hd, head, 2, j), d) : 0.f;
        dk[d] = 0.f;
        dv[d] = 0.f;
    }
    for (int i0 = 0; i0 < n; i0 += TILE) {
        __syncthreads();
        load_tile<HD>(qs, qkv, b, n, h, hd, head, 0, i0);
        for (int e = threadIdx.x; e < TILE * HD; e += blockDim.x) {
            const int ii = e / HD, d = e % HD, i = i0 + ii;
            gs[ii][d] = (i < n && d < hd)
                            ? ld(dout, (b * n + i) * (long long)h * hd + (long long)head * hd + d)
                            : 0.f;
        }
        for (int ii = threadIdx.x; ii < TILE; ii += blockDim.x) {
            const int i = i0 + ii;
            ls[ii] = i < n ? lse[bh * n + i] : 0.f;
            ds_[ii] = i < n ? delta[bh * n + i] : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        const int cnt = min(TILE, n - i0);
        for (int ii = 0; ii < cnt; ++ii) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int d = 0; d < HD; ++d) {
                s += qs[ii][d] * k[d];
                dp += gs[ii][d] * v[d];
            }
            const float p = expf(s * scale - ls[ii]);
            const float dsc = p * (dp - ds_[ii]);
#pragma unroll
            for (int d = 0; d < HD; ++d) {
                dv[d] += p * gs[ii][d];
                dk[d] += dsc * qs[ii][d];
            }
        }
    }
    if (!active) return;
    X* o = dqkv + (b * n + j) * (3LL * h * hd) + (long long)head * hd;
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        if (d < hd) {
            st(o, (long long)h * hd + d, dk[d] * scale);
            st(o, 2LL * h * hd + d, dv[d]);
        }
    }
}

template <typename X>
__device__ void attention_delta(const X* out, const X* dout, float* delta, long long rows, int n,
                                int h, int hd) {
    // Grid-stride: the launch's grid is capped (grid_1d), the rows are not.
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < rows * h;
         t += (long long)gridDim.x * blockDim.x) {
        const long long row = t / h;
        const int head = (int)(t % h);
        const X* o = out + row * h * hd + (long long)head * hd;
        const X* g = dout + row * h * hd + (long long)head * hd;
        float s = 0.f;
        for (int d = 0; d < hd; ++d) s += ld(o, d) * ld(g, d);
        const long long b = row / n, i = row % n;
        delta[(b * h + head) * n + i] = s;
    }
}

}  // namespace

extern "C" __global__ void attention_delta_f32(const float* out, const float* dout, float* delta,
                                               long long rows, int n, int h, int hd) {
    attention_delta(out, dout, delta, rows, n, h, hd);
}

extern "C" __global__ void attention_delta_bf16(const bf16_t* out, const bf16_t* dout,
                                                float* delta, long long rows, int n, int h,
                                                int hd) {
    attention_delta(out, dout, delta, rows, n, h, hd);
}

#define ATTENTION_KERNELS(HD, X, NAME)                                                          \
    extern "C" __global__ void attention_fwd_##NAME##_hd##HD(const X* qkv, X* out, float* lse,  \
                                                             int n, int h, int hd, float scale) { \
        attention_fwd<HD>(qkv, out, lse, n, h, hd, scale);                                        \
    }                                                                                            \
    extern "C" __global__ void attention_bwd_dq_##NAME##_hd##HD(                                 \
        const X* qkv, const X* dout, const float* lse, const float* delta, X* dqkv, int n, int h, \
        int hd, float scale) {                                                                   \
        attention_bwd_dq<HD>(qkv, dout, lse, delta, dqkv, n, h, hd, scale);                      \
    }                                                                                            \
    extern "C" __global__ void attention_bwd_dkv_##NAME##_hd##HD(                                \
        const X* qkv, const X* dout, const float* lse, const float* delta, X* dqkv, int n, int h, \
        int hd, float scale) {                                                                   \
        attention_bwd_dkv<HD>(qkv, dout, lse, delta, dqkv, n, h, hd, scale);                     \
    }

ATTENTION_KERNELS(32, float, f32)
ATTENTION_KERNELS(64, float, f32)
ATTENTION_KERNELS(128, float, f32)
ATTENTION_KERNELS(32, bf16_t, bf16)
ATTENTION_KERNELS(64, bf16_t, bf16)
ATTENTION_KERNELS(128, bf16_t, bf16)
