// Flash-style multi-head self-attention on CUDA cores (any head size), for the CUDA encoder
// engine of the MARLIN ViT video encoder.
//
// Compiled at run time by NVRTC with `--gpu-architecture=sm_XY --std=c++17 -DHEAD_DIM=<k>`,
// 1 <= k <= 256, one module per head size; no header is included; compiles for sm_70 and newer.
//
// Computes, for every clip b, head h and query row i < n:
//     out[b, i, h*HEAD_DIM + :] = sum_j softmax_j(scale * q_i . k_j) * v_j
// with q, k, v read from the packed projection
//     qkv [b, n, 3, heads, HEAD_DIM]  (a row of 3*D per token, D = heads*HEAD_DIM: q of every head,
//                                      then k, then v)
//     out [b, n, heads*HEAD_DIM]      (head h at columns h*HEAD_DIM ..)
// `scale` is any float (usually HEAD_DIM^-0.5; its sign is not assumed).
//
// Kernels:
//   attention_simt_f32 (const float* qkv, float* out, int n, int heads, float scale)
//   attention_simt_bf16(const bf16_t* qkv, bf16_t* out, int n, int heads, float scale)
//       bf16 in and out (bf16_t = unsigned short storing bf16); every product, the softmax and
//       the accumulation in f32; the output is rounded to nearest even once.
//
// Launch (fixed): grid = (ceil(n / 64), heads, b), block = 128 threads, static shared memory only,
// no dynamic shared memory.
//
// Scheme: a block owns 64 query rows of one (clip, head). TPR threads share a query row (TPR = 2
// for HEAD_DIM <= 128: the 64 rows in one pass; TPR = 4 beyond: two passes of 32 rows, so that
// each thread holds at most 64 floats of q and 64 of the output). A thread owns the float4
// chunks c*TPR + s of the (zero-padded) head dimension; the partial dot products of a row's
// threads are summed with __shfl_xor_sync. K and V tiles of BC keys are converted to f32 and
// staged in shared memory (rows padded to D4 floats with zeros; keys past n are zeros); scores
// are taken 16 keys at a time, with an online softmax (running max and running sum, exact expf);
// the n x n scores never leave registers. The partial last key tile is masked (keys past n get
// no weight), and query rows past n compute on zeros and are not written.
//
// Shared memory (static): 2 * BC * D4 * 4 bytes, D4 = HEAD_DIM rounded up to 4*TPR,
//   BC = 64 keys for D4 <= 80, 32 for D4 <= 160, 16 beyond:
//   HEAD_DIM 64: 32 KiB, 80: 40 KiB, 128: 32 KiB, 256: 32 KiB, 4: 4 KiB (always <= 40 KiB).

#ifndef HEAD_DIM
#error "attention_simt.cu: compile with -DHEAD_DIM=<head size> (1..256)"
#endif

typedef unsigned short bf16_t;

namespace {

constexpr int D = HEAD_DIM;
static_assert(D >= 1 && D <= 256, "attention_simt.cu: HEAD_DIM must be in 1..256");

constexpr int NTHREADS = 128;
constexpr int BR = 64;                                // query rows per block
constexpr int TPR = (D <= 128) ? 2 : 4;               // threads per query row
constexpr int ROWS_PER_PASS = NTHREADS / TPR;         // 64 or 32
constexpr int PASSES = BR / ROWS_PER_PASS;            // 1 or 2
constexpr int D4 = (D + 4 * TPR - 1) / (4 * TPR) * (4 * TPR);  // padded row (floats)
constexpr int NCH = D4 / (4 * TPR);                   // float4 chunks per thread
constexpr int BC = (D4 <= 80) ? 64 : ((D4 <= 160) ? 32 : 16);  // keys per shared tile
constexpr int SUB = 16;                               // keys per softmax step
static_assert(BC % SUB == 0, "key tile must be a multiple of the softmax step");
static_assert(2 * BC * D4 * 4 <= 48 * 1024, "static shared memory over 48 KiB");
static_assert(NCH * 4 <= 64, "per-thread register arrays too large");

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16_t* p) {
    return __uint_as_float(((unsigned int)*p) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(bf16_t* p, float v) { *p = f32_to_bf16(v); }

template <typename T>
__device__ __forceinline__ void attention_simt_body(const T* __restrict__ qkv, T* __restrict__ out,
                                                    int n, int heads, float scale) {
    __shared__ __align__(16) float sK[BC * D4];
    __shared__ __align__(16) float sV[BC * D4];

    const int tid = threadIdx.x;
    const int rl = tid / TPR;   // query row inside the pass
    const int sub = tid % TPR;  // this thread's share of the head dimension
    const int h = blockIdx.y;
    const int bi = blockIdx.z;

    const long long ld = 3ll * heads * D;  // elements between consecutive tokens in qkv
    const T* qbase = qkv + (long long)bi * n * ld + (long long)h * D;
    const T* kbase = qbase + (long long)heads * D;
    const T* vbase = qbase + 2ll * heads * D;
    T* obase = out + (long long)bi * n * heads * D + (long long)h * D;
    const long long ldo = (long long)heads * D;
    const int ntiles = (n + BC - 1) / BC;

#pragma unroll 1
    for (int pass = 0; pass < PASSES; ++pass) {
        const int row = blockIdx.x * BR + pass * ROWS_PER_PASS + rl;
        const bool row_ok = row < n;

        float q[NCH * 4];
        float o[NCH * 4];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int d = 4 * (c * TPR + sub) + e;
                q[4 * c + e] = (row_ok && d < D) ? load_f32(qbase + (long long)row * ld + d) : 0.f;
                o[4 * c + e] = 0.f;
            }
        }
        float m = neg_inf();  // running max of the scaled scores
        float l = 0.f;        // running sum of exp(score - m)

#pragma unroll 1
        for (int j = 0; j < ntiles; ++j) {
            const int k0 = j * BC;
            __syncthreads();  // the previous tile (or pass) is no longer read
            for (int idx = tid; idx < BC * D4; idx += NTHREADS) {
                const int r = idx / D4;
                const int d = idx - r * D4;
                const int key = k0 + r;
                float kv = 0.f, vv = 0.f;
                if (key < n && d < D) {
                    const long long off = (long long)key * ld + d;
                    kv = load_f32(kbase + off);
                    vv = load_f32(vbase + off);
                }
                sK[idx] = kv;
                sV[idx] = vv;
            }
            __syncthreads();

            const int kn = min(BC, n - k0);  // valid keys in this tile (>= 1)
#pragma unroll 1
            for (int j0 = 0; j0 < kn; j0 += SUB) {
                float sc[SUB];
#pragma unroll
                for (int jj = 0; jj < SUB; ++jj) {
                    const float4* kr = reinterpret_cast<const float4*>(sK + (j0 + jj) * D4) + sub;
                    float acc = 0.f;
#pragma unroll
                    for (int c = 0; c < NCH; ++c) {
                        const float4 kk = kr[c * TPR];
                        acc = fmaf(q[4 * c + 0], kk.x, acc);
                        acc = fmaf(q[4 * c + 1], kk.y, acc);
                        acc = fmaf(q[4 * c + 2], kk.z, acc);
                        acc = fmaf(q[4 * c + 3], kk.w, acc);
                    }
                    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
                    if (TPR == 4) acc += __shfl_xor_sync(0xffffffffu, acc, 2);
                    sc[jj] = (j0 + jj < kn) ? acc * scale : neg_inf();
                }
                // The first step holds key 0, so m is finite from then on.
                float mx = m;
#pragma unroll
                for (int jj = 0; jj < SUB; ++jj) mx = fmaxf(mx, sc[jj]);
                const float alpha = expf(m - mx);  // m = -inf on the first step: 0
                m = mx;
                l *= alpha;
#pragma unroll
                for (int i = 0; i < NCH * 4; ++i) o[i] *= alpha;
#pragma unroll
                for (int jj = 0; jj < SUB; ++jj) {
                    const float p = expf(sc[jj] - mx);  // masked keys: exp(-inf) = 0
                    l += p;
                    const float4* vr = reinterpret_cast<const float4*>(sV + (j0 + jj) * D4) + sub;
#pragma unroll
                    for (int c = 0; c < NCH; ++c) {
                        const float4 vv = vr[c * TPR];
                        o[4 * c + 0] = fmaf(p, vv.x, o[4 * c + 0]);
                        o[4 * c + 1] = fmaf(p, vv.y, o[4 * c + 1]);
                        o[4 * c + 2] = fmaf(p, vv.z, o[4 * c + 2]);
                        o[4 * c + 3] = fmaf(p, vv.w, o[4 * c + 3]);
                    }
                }
            }
        }

        if (row_ok) {
            const float inv = 1.0f / l;
            T* orow = obase + (long long)row * ldo;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int d = 4 * (c * TPR + sub) + e;
                    if (d < D) store_f32(orow + d, o[4 * c + e] * inv);
                }
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128)
attention_simt_f32(const float* __restrict__ qkv, float* __restrict__ out, int n, int heads,
                   float scale) {
    attention_simt_body(qkv, out, n, heads, scale);
}

extern "C" __global__ void __launch_bounds__(128)
attention_simt_bf16(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ out, int n, int heads,
                    float scale) {
    attention_simt_body(qkv, out, n, heads, scale);
}
