// Flash-attention-2-style multi-head self-attention on tensor cores (inline-PTX mma.sync), for
// the CUDA encoder engine of the MARLIN ViT video encoder. sm_80 and newer only.
//
// Compiled at run time by NVRTC with `--gpu-architecture=sm_XY --std=c++17 -DHEAD_DIM=<k>`,
// k a multiple of 16 in 16..128, one module per head size; no header is included.
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
//   attention_mma_bf16(const bf16_t* qkv, bf16_t* out, int n, int heads, float scale)
//       bf16 storage (bf16_t = unsigned short storing bf16). S = Q K^T with
//       mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 (f32 accumulation); softmax statistics in f32
//       with exp2 (scale*log2(e) folded in); P rounded to bf16 for P V (as flash attention does),
//       O accumulated in f32 and rounded to bf16 once at the end.
//   attention_mma_tf32(const float* qkv, float* out, int n, int heads, float scale)
//       f32 storage. mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32; operands rounded to tf32 with
//       cvt.rna.tf32.f32 (q is pre-multiplied by scale*log2(e) in f32 before its rounding); P kept
//       in f32 and rounded to tf32 for P V.
//
// Launch (fixed): grid = (ceil(n / 64), heads, b), block = 128 threads = 4 warps, each warp owning
// 16 query rows; static shared memory only (no dynamic shared memory).
//
// Structure (flash attention 2): Q fragments live in registers for the whole block (read once
// from global memory); K and V tiles of BC keys are copied to shared memory with cp.async
// (16-byte copies, zero-filled past n) into one K buffer and one V buffer, staggered so that the
// copy of V_j overlaps S_j = Q K_j^T and the copy of K_{j+1} overlaps P_j V_j. The running max
// and the running sum are kept per query row (each row is shared by the 4 threads of a quad,
// combined with __shfl_xor_sync); the running sum is reduced across the quad once, at the end.
// Keys past n get a score of -inf (weight 0), query rows past n compute on zeros and are not
// written.
//
// Shared memory (static):
//   bf16: BC = 64 keys, rows padded by 16 bytes (conflict-free ldmatrix):
//         2 * 64 * (HEAD_DIM + 8) * 2 bytes: 16: 6 KiB, 64: 18 KiB, 128: 34 KiB.
//   tf32: BC = 64 keys for HEAD_DIM <= 64, 32 beyond; rows padded by 16 bytes (conflict-free
//         fragment loads): 2 * BC * (HEAD_DIM + 4) * 4 bytes: 16: 10 KiB, 64: 34 KiB, 128: 33 KiB.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / mma.m16n8k8"), with
// g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group):
//   m16n8k16 bf16: A (16x16, row) regs a0..a3 = {(g, 2t..2t+1), (g+8, 2t..2t+1),
//                  (g, 2t+8..2t+9), (g+8, 2t+8..2t+9)} (two bf16 per reg, lower column in the
//                  low half); B (16x8, col) regs b0, b1 = {(k 2t..2t+1, n g), (k 2t+8..2t+9, n g)};
//                  C (16x8) c0..c3 = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
//   m16n8k8 tf32:  A a0..a3 = {(g, t), (g+8, t), (g, t+4), (g+8, t+4)};
//                  B b0, b1 = {(k t, n g), (k t+4, n g)}; C as for m16n8k16.
// The C fragment of S (16 x 8 keys) is the A fragment of P V: directly for bf16 (two n-tiles of
// S make one 16-key k-step); for tf32 the 8 keys of an n-tile are taken in the order
// k = t <-> key 2t, k = t + 4 <-> key 2t + 1 (a0 = c0... see below), and V's B fragment is read
// in the same key order, so the sum over keys is unchanged.

#ifndef HEAD_DIM
#error "attention_mma.cu: compile with -DHEAD_DIM=<head size> (a multiple of 16 in 16..128)"
#endif

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
#error "attention_mma.cu needs sm_80 or newer (mma.sync bf16/tf32, cp.async, ldmatrix)"
#endif

typedef unsigned short bf16_t;

namespace {

constexpr int D = HEAD_DIM;
static_assert(D % 16 == 0 && D >= 16 && D <= 128,
              "attention_mma.cu: HEAD_DIM must be a multiple of 16 in 16..128");

constexpr int NTHREADS = 128;
constexpr int BR = 64;  // query rows per block: 4 warps x 16
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x (MUFU.EX2; ex2(-inf) = +0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// {lo, hi} -> bf16x2 with lo in the low half (round to nearest even). cvt.rn.bf16x2.f32 d, a, b
// puts a in the upper half and b in the lower half.
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned int to_tf32(float x) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy global -> shared; zero-fills the 16 bytes when !pred (src not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    const int src_bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
                 "l"(gmem), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int& r0, unsigned int& r1, unsigned int& r2,
                                            unsigned int& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int& r0, unsigned int& r1,
                                                  unsigned int& r2, unsigned int& r3,
                                                  const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(p))
                 : "memory");
}

// c += A (16x16 bf16, row) * B (16x8 bf16, col), f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned int (&a)[4],
                                               unsigned int b0, unsigned int b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += A (16x8 tf32, row) * B (8x8 tf32, col), f32 accumulators.
__device__ __forceinline__ void mma_tf32_1688(float (&c)[4], unsigned int a0, unsigned int a1,
                                              unsigned int a2, unsigned int a3, unsigned int b0,
                                              unsigned int b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    return v;
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

// Copies keys k0 .. k0+BC-1 (rows of D elements, `ld` elements apart in global memory) into a
// shared tile with LDS elements per row; rows past n are zero-filled. All 128 threads call.
template <int BC, int LDS, typename T>
__device__ __forceinline__ void load_tile_async(T* s, const T* src, long long ld, int k0, int n,
                                                int tid) {
    constexpr int CHUNK = 16 / (int)sizeof(T);  // elements per 16-byte copy
    constexpr int CHUNKS = D / CHUNK;           // copies per row
    constexpr int TOTAL = BC * CHUNKS;
    static_assert(TOTAL % NTHREADS == 0, "tile copies must divide among the threads");
#pragma unroll
    for (int i = 0; i < TOTAL / NTHREADS; ++i) {
        const int c = tid + i * NTHREADS;
        const int r = c / CHUNKS;
        const int col = (c - r * CHUNKS) * CHUNK;
        const int key = k0 + r;
        const bool ok = key < n;
        const T* g = src + (long long)(ok ? key : 0) * ld + col;
        cp_async16(s + r * LDS + col, g, ok);
    }
}

}  // namespace

// ================================================================================================
// bf16: m16n8k16
// ================================================================================================

extern "C" __global__ void __launch_bounds__(128)
attention_mma_bf16(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ out, int n, int heads,
                   float scale) {
    constexpr int BC = 64;       // keys per tile
    constexpr int LDS = D + 8;   // shared row stride (bf16): +16 bytes, conflict-free ldmatrix
    constexpr int KD = D / 16;   // k-steps of Q K^T
    constexpr int NT = BC / 8;   // n-tiles of S (8 keys each)
    constexpr int KP = BC / 16;  // k-steps of P V (16 keys each)
    constexpr int ND = D / 8;    // n-tiles of O (8 columns each)

    __shared__ __align__(128) bf16_t sK[BC * LDS];
    __shared__ __align__(128) bf16_t sV[BC * LDS];

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, bi = blockIdx.z;

    const long long ld = 3ll * heads * D;  // elements between consecutive tokens in qkv
    const bf16_t* qbase = qkv + (long long)bi * n * ld + (long long)h * D;
    const bf16_t* kbase = qbase + (long long)heads * D;
    const bf16_t* vbase = qbase + 2ll * heads * D;
    const int ntiles = (n + BC - 1) / BC;

    // K tile 0 is on its way while Q is read.
    load_tile_async<BC, LDS>(sK, kbase, ld, 0, n, tid);
    cp_async_commit();

    // Q fragments (A operand, 16 rows x D) straight from global memory; rows past n are zeros.
    const int r0 = blockIdx.x * BR + warp * 16 + g;
    const int r1 = r0 + 8;
    const bool ok0 = r0 < n, ok1 = r1 < n;
    unsigned int qf[KD][4];
    {
        const bf16_t* q0 = qbase + (long long)(ok0 ? r0 : 0) * ld + 2 * t;
        const bf16_t* q1 = qbase + (long long)(ok1 ? r1 : 0) * ld + 2 * t;
        // A negative scale is folded into q by flipping signs (exact), so the softmax below
        // multiplies scores by |scale| * log2(e) > 0 and may take the max of the raw scores.
        const unsigned int flip = scale < 0.f ? 0x80008000u : 0u;
#pragma unroll
        for (int kc = 0; kc < KD; ++kc) {
            qf[kc][0] = ok0 ? (*reinterpret_cast<const unsigned int*>(q0 + kc * 16) ^ flip) : 0u;
            qf[kc][1] = ok1 ? (*reinterpret_cast<const unsigned int*>(q1 + kc * 16) ^ flip) : 0u;
            qf[kc][2] = ok0 ? (*reinterpret_cast<const unsigned int*>(q0 + kc * 16 + 8) ^ flip) : 0u;
            qf[kc][3] = ok1 ? (*reinterpret_cast<const unsigned int*>(q1 + kc * 16 + 8) ^ flip) : 0u;
        }
    }
    // > 0 (a zero scale becomes a tiny positive one: -inf * sl2 stays -inf, never NaN).
    const float sl2 = fmaxf(fabsf(scale) * LOG2E, 1e-30f);

    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = neg_inf(), m1 = neg_inf();  // running max of the raw scores, rows g and g+8
    float l0 = 0.f, l1 = 0.f;              // this thread's part of the running sums

#pragma unroll 1
    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BC;
        cp_async_wait_all();
        __syncthreads();  // K_j is in sK; every warp is done with V_{j-1}
        load_tile_async<BC, LDS>(sV, vbase, ld, k0, n, tid);
        cp_async_commit();

        // ---- S = Q K_j^T (16 x 64 per warp) ----
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KD; ++kc) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                // matrices: (keys +0..7, dims +0..7), (keys +0..7, dims +8..15),
                //           (keys +8..15, dims +0..7), (keys +8..15, dims +8..15)
                // = b0, b1 of n-tile 2np, then b0, b1 of n-tile 2np+1.
                const int key = np * 16 + ((lane >> 4) << 3) + (lane & 7);
                const int dim = kc * 16 + (((lane >> 3) & 1) << 3);
                unsigned int b0, b1, b2, b3;
                ldmatrix_x4(b0, b1, b2, b3, sK + key * LDS + dim);
                mma_bf16_16816(s[2 * np], qf[kc], b0, b1);
                mma_bf16_16816(s[2 * np + 1], qf[kc], b2, b3);
            }
        }

        // ---- mask keys past n (last tile only) ----
        if (k0 + BC > n) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int key = k0 + nt * 8 + 2 * t;
                if (key >= n) { s[nt][0] = neg_inf(); s[nt][2] = neg_inf(); }
                if (key + 1 >= n) { s[nt][1] = neg_inf(); s[nt][3] = neg_inf(); }
            }
        }

        // ---- online softmax ----
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        // (mx is finite: tile 0 holds key 0; the guard only keeps -inf - -inf out.)
        const float ms0 = (mx0 == neg_inf()) ? 0.f : mx0 * sl2;
        const float ms1 = (mx1 == neg_inf()) ? 0.f : mx1 * sl2;
        const float alpha0 = fast_exp2(fmaf(m0, sl2, -ms0));  // m = -inf: 0
        const float alpha1 = fast_exp2(fmaf(m1, sl2, -ms1));
        m0 = mx0;
        m1 = mx1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            o[i][0] *= alpha0;
            o[i][1] *= alpha0;
            o[i][2] *= alpha1;
            o[i][3] *= alpha1;
        }
        // P in bf16, as the A operand of P V: k-step kk = n-tiles 2kk (keys 0..7) and 2kk+1.
        unsigned int pf[KP][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float p0 = fast_exp2(fmaf(s[nt][0], sl2, -ms0));
            const float p1 = fast_exp2(fmaf(s[nt][1], sl2, -ms0));
            const float p2 = fast_exp2(fmaf(s[nt][2], sl2, -ms1));
            const float p3 = fast_exp2(fmaf(s[nt][3], sl2, -ms1));
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[nt >> 1][(nt & 1) * 2 + 0] = pack_bf16x2(p0, p1);  // row g,   keys 2t, 2t+1
            pf[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16x2(p2, p3);  // row g+8, keys 2t, 2t+1
        }

        cp_async_wait_all();
        __syncthreads();  // V_j is in sV; every warp is done with K_j
        if (j + 1 < ntiles) load_tile_async<BC, LDS>(sK, kbase, ld, k0 + BC, n, tid);
        cp_async_commit();

        // ---- O += P V_j ----
#pragma unroll
        for (int kk = 0; kk < KP; ++kk) {
#pragma unroll
            for (int dp = 0; dp < ND / 2; ++dp) {
                // transposed matrices: (keys +0..7, dims +0..7), (keys +8..15, dims +0..7),
                //                      (keys +0..7, dims +8..15), (keys +8..15, dims +8..15)
                // = b0, b1 of n-tile 2dp, then b0, b1 of n-tile 2dp+1.
                const int key = kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
                const int dim = dp * 16 + ((lane >> 4) << 3);
                unsigned int b0, b1, b2, b3;
                ldmatrix_x4_trans(b0, b1, b2, b3, sV + key * LDS + dim);
                mma_bf16_16816(o[2 * dp], pf[kk], b0, b1);
                mma_bf16_16816(o[2 * dp + 1], pf[kk], b2, b3);
            }
        }
    }
    cp_async_wait_all();  // nothing is in flight, but leave no copy behind

    // ---- O / l, bf16, store ----
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const long long ldo = (long long)heads * D;
    bf16_t* obase = out + (long long)bi * n * ldo + (long long)h * D + 2 * t;
    if (ok0) {
        bf16_t* orow = obase + (long long)r0 * ldo;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            *reinterpret_cast<unsigned int*>(orow + i * 8) = pack_bf16x2(o[i][0] * inv0, o[i][1] * inv0);
        }
    }
    if (ok1) {
        bf16_t* orow = obase + (long long)r1 * ldo;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            *reinterpret_cast<unsigned int*>(orow + i * 8) = pack_bf16x2(o[i][2] * inv1, o[i][3] * inv1);
        }
    }
}

// ================================================================================================
// tf32: m16n8k8
// ================================================================================================

extern "C" __global__ void __launch_bounds__(128)
attention_mma_tf32(const float* __restrict__ qkv, float* __restrict__ out, int n, int heads,
                   float scale) {
    constexpr int BC = (D <= 64) ? 64 : 32;  // keys per tile (shared memory <= 48 KiB)
    constexpr int LDS = D + 4;  // shared row stride (floats): +16 bytes, conflict-free reads
    constexpr int KD = D / 8;   // k-steps of Q K^T
    constexpr int NT = BC / 8;  // n-tiles of S = k-steps of P V (8 keys each)
    constexpr int ND = D / 8;   // n-tiles of O

    __shared__ __align__(128) float sK[BC * LDS];
    __shared__ __align__(128) float sV[BC * LDS];

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, bi = blockIdx.z;

    const long long ld = 3ll * heads * D;
    const float* qbase = qkv + (long long)bi * n * ld + (long long)h * D;
    const float* kbase = qbase + (long long)heads * D;
    const float* vbase = qbase + 2ll * heads * D;
    const int ntiles = (n + BC - 1) / BC;

    load_tile_async<BC, LDS>(sK, kbase, ld, 0, n, tid);
    cp_async_commit();

    // Q fragments, pre-multiplied by scale*log2(e) in f32, then rounded to tf32: scores come out
    // of the MMA in log2 units.
    const float sl2 = scale * LOG2E;
    const int r0 = blockIdx.x * BR + warp * 16 + g;
    const int r1 = r0 + 8;
    const bool ok0 = r0 < n, ok1 = r1 < n;
    unsigned int qf[KD][4];
    {
        const float* q0 = qbase + (long long)(ok0 ? r0 : 0) * ld + t;
        const float* q1 = qbase + (long long)(ok1 ? r1 : 0) * ld + t;
#pragma unroll
        for (int kc = 0; kc < KD; ++kc) {
            qf[kc][0] = to_tf32(ok0 ? q0[kc * 8] * sl2 : 0.f);      // (g,   t)
            qf[kc][1] = to_tf32(ok1 ? q1[kc * 8] * sl2 : 0.f);      // (g+8, t)
            qf[kc][2] = to_tf32(ok0 ? q0[kc * 8 + 4] * sl2 : 0.f);  // (g,   t+4)
            qf[kc][3] = to_tf32(ok1 ? q1[kc * 8 + 4] * sl2 : 0.f);  // (g+8, t+4)
        }
    }

    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = neg_inf(), m1 = neg_inf();  // running max (log2 units), rows g and g+8
    float l0 = 0.f, l1 = 0.f;

#pragma unroll 1
    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BC;
        cp_async_wait_all();
        __syncthreads();  // K_j is in sK; every warp is done with V_{j-1}
        load_tile_async<BC, LDS>(sV, vbase, ld, k0, n, tid);
        cp_async_commit();

        // ---- S = Q K_j^T ----
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < KD; ++kc) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float* kr = sK + (nt * 8 + g) * LDS + kc * 8 + t;
                const unsigned int b0 = to_tf32(kr[0]);  // (k = dim t,   n = key g)
                const unsigned int b1 = to_tf32(kr[4]);  // (k = dim t+4, n = key g)
                mma_tf32_1688(s[nt], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3], b0, b1);
            }
        }

        if (k0 + BC > n) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int key = k0 + nt * 8 + 2 * t;
                if (key >= n) { s[nt][0] = neg_inf(); s[nt][2] = neg_inf(); }
                if (key + 1 >= n) { s[nt][1] = neg_inf(); s[nt][3] = neg_inf(); }
            }
        }

        // ---- online softmax (log2 units) ----
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        const float mz0 = (mx0 == neg_inf()) ? 0.f : mx0;
        const float mz1 = (mx1 == neg_inf()) ? 0.f : mx1;
        const float alpha0 = fast_exp2(m0 - mz0);
        const float alpha1 = fast_exp2(m1 - mz1);
        m0 = mx0;
        m1 = mx1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            o[i][0] *= alpha0;
            o[i][1] *= alpha0;
            o[i][2] *= alpha1;
            o[i][3] *= alpha1;
        }
        // P as the A operand of P V (k-step nt = the 8 keys of n-tile nt, in the order
        // k = t <-> key 2t, k = t+4 <-> key 2t+1):
        //   a0 = (g, k t) = P(g, 2t) = c0, a1 = (g+8, k t) = c2,
        //   a2 = (g, k t+4) = P(g, 2t+1) = c1, a3 = (g+8, k t+4) = c3.
        unsigned int pf[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float p0 = fast_exp2(s[nt][0] - mz0);
            const float p1 = fast_exp2(s[nt][1] - mz0);
            const float p2 = fast_exp2(s[nt][2] - mz1);
            const float p3 = fast_exp2(s[nt][3] - mz1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[nt][0] = to_tf32(p0);
            pf[nt][1] = to_tf32(p2);
            pf[nt][2] = to_tf32(p1);
            pf[nt][3] = to_tf32(p3);
        }

        cp_async_wait_all();
        __syncthreads();  // V_j is in sV; every warp is done with K_j
        if (j + 1 < ntiles) load_tile_async<BC, LDS>(sK, kbase, ld, k0 + BC, n, tid);
        cp_async_commit();

        // ---- O += P V_j ----
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            // b0 = (k t -> key 2t, n = dim g), b1 = (k t+4 -> key 2t+1, n = dim g)
            const float* v0 = sV + (nt * 8 + 2 * t) * LDS + g;
#pragma unroll
            for (int i = 0; i < ND; ++i) {
                const unsigned int b0 = to_tf32(v0[i * 8]);
                const unsigned int b1 = to_tf32(v0[LDS + i * 8]);
                mma_tf32_1688(o[i], pf[nt][0], pf[nt][1], pf[nt][2], pf[nt][3], b0, b1);
            }
        }
    }
    cp_async_wait_all();

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const long long ldo = (long long)heads * D;
    float* obase = out + (long long)bi * n * ldo + (long long)h * D + 2 * t;
    if (ok0) {
        float* orow = obase + (long long)r0 * ldo;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            *reinterpret_cast<float2*>(orow + i * 8) = make_float2(o[i][0] * inv0, o[i][1] * inv0);
        }
    }
    if (ok1) {
        float* orow = obase + (long long)r1 * ldo;
#pragma unroll
        for (int i = 0; i < ND; ++i) {
            *reinterpret_cast<float2*>(orow + i * 8) = make_float2(o[i][2] * inv1, o[i][3] * inv1);
        }
    }
}
