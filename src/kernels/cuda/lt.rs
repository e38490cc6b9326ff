//! The schedule's products on cuBLASLt: `D = A · Wᵀ + bias (+ D)` with the bias (and the
//! residual, as C = D) in the epilogue, the algorithm chosen once per shape.
//!
//! cuBLASLt is column-major. A row-major matrix `R [r, c]` is the column-major `Rᵀ [c, r]`
//! with leading dimension c, so the row-major `Y [m, n] = X [m, k] · W [n, k]ᵀ` is the
//! column-major `Yᵀ [n, m] = W' · Xᵀ` where the weight buffer (row-major `[n, k]`, i.e. the
//! column-major `[k, n]`) is transposed by the operation (`TRANSA = T`) and the activations
//! (column-major `[k, m]`) are not: the "TN" layout, both operands K-major, which every
//! tensor-core path takes (TF32 requires it on Hopper). The bias, a vector over D's rows (n),
//! is what cuBLASLt's `BIAS` epilogue adds.

use crate::engine::schedule::{act_dtype, compute_dtype, DType, Gemm};
use crate::kernels::Precision;

/// How cuBLASLt computes: f32 sums always; TF32 rounds f32 operands for the tensor cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// `CUBLAS_COMPUTE_32F`: f32 operands stay f32 (never TF32); bf16 operands, f32 sums.
    F32,
    /// `CUBLAS_COMPUTE_32F_FAST_TF32`.
    Tf32,
}

/// One matrix as cuBLASLt sees it: column-major `rows x cols`, leading dimension `ld`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
}

/// Everything cuBLASLt is told about one product of the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmDesc {
    pub compute: Compute,
    /// The weight: column-major `[k, n]` (row-major `[n, k]`), transposed by the operation.
    pub a: Layout,
    pub trans_a: bool,
    /// The activations: column-major `[k, m]`.
    pub b: Layout,
    pub trans_b: bool,
    /// C (= D when accumulating) and D: column-major `[n, m]`.
    pub c: Layout,
    pub d: Layout,
    /// The `BIAS` epilogue (bias of D's type, length n).
    pub bias: bool,
    /// 1 to add onto D (the residual stream), 0 to overwrite.
    pub beta: f32,
}

/// The cuBLASLt description of `g` in `precision`.
pub fn describe(g: &Gemm, precision: Precision) -> GemmDesc {
    let w = compute_dtype(precision);
    let a_type = act_dtype(g.a, precision);
    let d_type = act_dtype(g.d, precision);
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    let d = Layout {
        dtype: d_type,
        rows: n,
        cols: m,
        ld: n as i64,
    };
    GemmDesc {
        compute: match precision {
            Precision::Tf32 => Compute::Tf32,
            _ => Compute::F32,
        },
        a: Layout {
            dtype: w,
            rows: k,
            cols: n,
            ld: k as i64,
        },
        trans_a: true,
        b: Layout {
            dtype: a_type,
            rows: k,
            cols: m,
            ld: k as i64,
        },
        trans_b: false,
        c: d,
        d,
        bias: g.bias,
        beta: if g.accumulate { 1.0 } else { 0.0 },
    }
}

/// The cuBLASLt description of a training product ([`crate::engine::train::Gemm`]) whose
/// operands (A and B) are of `types[0]` and whose output (C = D, and the bias) of `types[1]`:
/// bf16 operands compute with f32 sums (`CUBLAS_COMPUTE_32F`) whatever `precision`; f32 operands
/// in fp32, or in TF32 when `precision` is tf32 or bf16 (a bf16 step's few f32 products).
/// Row-major `D [m, n] (+)= op(A) · op(B) (+ bias)` is the column-major
/// `Dᵀ [n, m] = op(B)ᵀ · op(A)ᵀ`, so cuBLASLt's first operand is the B buffer and its second
/// the A buffer. A row-major buffer read as column-major is its transpose, so an operand the
/// row-major product does not transpose needs no transpose here (and the reverse): the
/// forward `x · Wᵀ` is TN as in [`describe`], the input gradient `dy · W` is NN, the weight
/// gradient `dyᵀ · x` is NT.
pub fn describe_train(
    g: &crate::engine::train::Gemm,
    precision: Precision,
    [operands, out]: [DType; 2],
) -> GemmDesc {
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    let f = |rows: u64, cols: u64| Layout {
        dtype: operands,
        rows,
        cols,
        ld: rows as i64,
    };
    let d = Layout {
        dtype: out,
        ..f(n, m)
    };
    GemmDesc {
        compute: match (operands, precision) {
            (DType::F32, Precision::Tf32 | Precision::Bf16) => Compute::Tf32,
            _ => Compute::F32,
        },
        // B: row-major [k, n] is column-major [n, k] (= op(B)ᵀ as it is); row-major [n, k]
        // (tb) is column-major [k, n], transposed by the operation.
        a: if g.tb { f(k, n) } else { f(n, k) },
        trans_a: g.tb,
        // A: row-major [m, k] is column-major [k, m] (= op(A)ᵀ); row-major [k, m] (ta) is
        // column-major [m, k], transposed.
        b: if g.ta { f(m, k) } else { f(k, m) },
        trans_b: g.ta,
        c: d,
        d,
        bias: g.bias.is_some(),
        beta: if g.accumulate { 1.0 } else { 0.0 },
    }
}

/// The element of row-major `[rows, cols]` at (r, c) as column-major layout `l` addresses it
/// (the transposed view): `c + r * ld`. For tests of the layouts.
pub fn offset(l: &Layout, row_major: (u64, u64)) -> u64 {
    let (r, c) = row_major;
    c + r * l.ld as u64
}

#[cfg(feature = "cuda-engine")]
pub use run::{LtGemm, LtHandle};

#[cfg(feature = "cuda-engine")]
mod run {
    use super::*;
    use cudarc::cublaslt::{result, sys};
    use std::ffi::c_void;

    /// `cublasOperation_t` (cublas_api.h; cudarc's cuBLASLt bindings lack it).
    const CUBLAS_OP_N: i32 = 0;
    const CUBLAS_OP_T: i32 = 1;

    fn data_type(t: DType) -> sys::cudaDataType {
        match t {
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }

    fn err(call: &str, e: result::CublasError) -> String {
        format!("cuBLASLt {call}: {e}")
    }

    /// A cuBLASLt handle (destroyed on drop).
    pub struct LtHandle(pub sys::cublasLtHandle_t);

    // SAFETY: a cuBLASLt handle may be used from any thread, one call at a time (the engine
    // holds it behind its lock).
    unsafe impl Send for LtHandle {}

    impl LtHandle {
        /// Open cuBLASLt (found by `libs`) and create a handle.
        pub fn new() -> Result<Self, String> {
            let _ = super::super::libs::preload(&super::super::libs::CUBLASLT);
            // SAFETY: only asks whether cudarc's loader can open the library.
            if !unsafe { sys::is_culib_present() } {
                return Err(super::super::libs::missing(&super::super::libs::CUBLASLT));
            }
            result::create_handle()
                .map(Self)
                .map_err(|e| err("cublasLtCreate", e))
        }

        /// cuBLASLt's version (e.g. 120903).
        pub fn version(&self) -> usize {
            // SAFETY: a plain query of the loaded library.
            unsafe { sys::cublasLtGetVersion() }
        }
    }

    impl Drop for LtHandle {
        fn drop(&mut self) {
            // SAFETY: created by cublasLtCreate, destroyed once.
            unsafe {
                let _ = result::destroy_handle(self.0);
            }
        }
    }

    /// The alignment cuBLASLt may assume of a device pointer: the largest power of two that
    /// divides it, at most 256 bytes.
    pub fn alignment(ptr: u64) -> u32 {
        1u32 << ptr.trailing_zeros().min(8)
    }

    /// One product with its descriptors and chosen algorithm.
    pub struct LtGemm {
        desc: sys::cublasLtMatmulDesc_t,
        layouts: [sys::cublasLtMatrixLayout_t; 4],
        algo: sys::cublasLtMatmulAlgo_t,
        pub workspace: usize,
        beta: f32,
    }

    // SAFETY: the descriptors are plain host objects, used one call at a time behind the
    // engine's lock.
    unsafe impl Send for LtGemm {}

    impl Drop for LtGemm {
        fn drop(&mut self) {
            // SAFETY: each descriptor was created once by `new` and is destroyed once here.
            unsafe {
                let _ = result::destroy_matmul_desc(self.desc);
                for l in self.layouts {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
        }
    }

    impl LtGemm {
        /// The descriptors of `g` and the heuristic's best algorithm within `max_workspace`
        /// bytes; `bias` is the device pointer of the bias (D's type, length n). `operands`:
        /// the device pointers A, B, C, D will have (slices of larger buffers), so that the
        /// heuristic picks only algorithms that work at their alignment (it assumes 256
        /// bytes otherwise, and some algorithms then fault on a slice).
        pub fn new(
            h: &LtHandle,
            g: &GemmDesc,
            bias: Option<u64>,
            max_workspace: usize,
            operands: Option<[u64; 4]>,
        ) -> Result<Self, String> {
            let (compute, scale) = match g.compute {
                Compute::F32 => (
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType::CUDA_R_32F,
                ),
                Compute::Tf32 => (
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                    sys::cudaDataType::CUDA_R_32F,
                ),
            };
            let desc = result::create_matmul_desc(compute, scale)
                .map_err(|e| err("cublasLtMatmulDescCreate", e))?;
            let mut me = Self {
                desc,
                layouts: [std::ptr::null_mut(); 4],
                // SAFETY: a plain-data struct that the heuristic overwrites before any use.
                algo: unsafe { std::mem::zeroed() },
                workspace: 0,
                beta: g.beta,
            };
            for (i, l) in [g.a, g.b, g.c, g.d].iter().enumerate() {
                me.layouts[i] =
                    result::create_matrix_layout(data_type(l.dtype), l.rows, l.cols, l.ld)
                        .map_err(|e| err("cublasLtMatrixLayoutCreate", e))?;
            }
            let set = |attr: sys::cublasLtMatmulDescAttributes_t, v: *const c_void, n: usize| {
                // SAFETY: `desc` is live; `v` points to `n` readable bytes of the attribute's type.
                unsafe { result::set_matmul_desc_attribute(desc, attr, v, n) }
                    .map_err(|e| err("cublasLtMatmulDescSetAttribute", e))
            };
            let ta = if g.trans_a { CUBLAS_OP_T } else { CUBLAS_OP_N };
            let tb = if g.trans_b { CUBLAS_OP_T } else { CUBLAS_OP_N };
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const i32 as *const c_void,
                4,
            )?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const i32 as *const c_void,
                4,
            )?;
            if let (true, Some(ptr)) = (g.bias, bias) {
                let epi = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const _ as *const c_void,
                    std::mem::size_of_val(&epi),
                )?;
                let p = ptr as *const c_void;
                set(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &p as *const *const c_void as *const c_void,
                    std::mem::size_of::<*const c_void>(),
                )?;
            }
            let pref = result::create_matmul_pref()
                .map_err(|e| err("cublasLtMatmulPreferenceCreate", e))?;
            let ws = max_workspace as u64;
            // SAFETY: `pref` is live; the attribute is a u64.
            let r = unsafe {
                result::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )
            };
            let align_attrs = [
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            let r = r.and_then(|_| match operands {
                None => Ok(()),
                Some(ptrs) => align_attrs.iter().zip(ptrs).try_fold((), |(), (&attr, p)| {
                    let bytes = alignment(p);
                    // SAFETY: `pref` is live; the attribute is a u32.
                    unsafe {
                        result::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &bytes as *const u32 as *const c_void,
                            4,
                        )
                    }
                }),
            });
            // SAFETY: every descriptor is live.
            let heur = r.and_then(|_| unsafe {
                result::get_matmul_algo_heuristic(
                    h.0,
                    desc,
                    me.layouts[0],
                    me.layouts[1],
                    me.layouts[2],
                    me.layouts[3],
                    pref,
                )
            });
            // SAFETY: created above, destroyed once.
            unsafe {
                let _ = result::destroy_matmul_pref(pref);
            }
            let heur = heur.map_err(|e| {
                err(
                    "cublasLtMatmulAlgoGetHeuristic (no algorithm for this shape)",
                    e,
                )
            })?;
            me.algo = heur.algo;
            me.workspace = heur.workspaceSize;
            Ok(me)
        }

        /// Queue the product on `stream`.
        ///
        /// # Safety
        /// The pointers are device buffers of the described layouts (C = D when accumulating),
        /// the workspace holds `self.workspace` bytes, and all stay valid until the stream's
        /// work completes.
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn run(
            &self,
            h: &LtHandle,
            a: u64,
            b: u64,
            d: u64,
            workspace: u64,
            stream: cudarc::driver::sys::CUstream,
        ) -> Result<(), String> {
            let alpha = 1f32;
            let beta = self.beta;
            result::matmul(
                h.0,
                self.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                self.layouts[0],
                b as *const c_void,
                self.layouts[1],
                d as *const c_void,
                self.layouts[2],
                d as *mut c_void,
                self.layouts[3],
                &self.algo,
                workspace as *mut c_void,
                self.workspace,
                stream as sys::cudaStream_t,
            )
            .map_err(|e| err("cublasLtMatmul", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::schedule::{Act, Linear};

    fn qkv(m: usize) -> Gemm {
        Gemm {
            a: Act::H,
            w: Linear::Qkv(0),
            d: Act::Qkv,
            accumulate: false,
            m,
            n: 2304,
            k: 768,
            bias: true,
        }
    }

    #[test]
    fn products_are_tn_with_k_major_operands() {
        let g = describe(&qkv(100352), Precision::Bf16);
        assert!(g.trans_a && !g.trans_b);
        assert_eq!((g.a.rows, g.a.cols, g.a.ld), (768, 2304, 768));
        assert_eq!((g.b.rows, g.b.cols, g.b.ld), (768, 100352, 768));
        assert_eq!((g.d.rows, g.d.cols, g.d.ld), (2304, 100352, 2304));
        assert_eq!(
            (g.a.dtype, g.b.dtype, g.d.dtype),
            (DType::Bf16, DType::Bf16, DType::Bf16)
        );
        assert_eq!((g.beta, g.bias, g.compute), (0.0, true, Compute::F32));
        // Row-major D[r, c] is the column-major element (c, r): offset c + r * ld.
        assert_eq!(offset(&g.d, (3, 5)), 5 + 3 * 2304);
    }

    /// cuBLASLt's column-major product as `desc` describes it, computed naively: `D = op(A')
    /// · op(B') + bias (+ beta D)` with A' = `a`, B' = `b`.
    #[allow(clippy::needless_range_loop)] // (i, j, p) index three matrices, as the formula reads
    fn column_major(desc: &GemmDesc, a: &[f32], b: &[f32], bias: &[f32], d: &mut [f32]) {
        let (rows, cols) = (desc.d.rows as usize, desc.d.cols as usize);
        let inner = if desc.trans_a {
            desc.a.rows
        } else {
            desc.a.cols
        } as usize;
        let at = |l: &Layout, t: bool, i: usize, p: usize, x: &[f32]| {
            let ld = l.ld as usize;
            if t {
                x[p + i * ld]
            } else {
                x[i + p * ld]
            }
        };
        for j in 0..cols {
            for i in 0..rows {
                let mut s = 0f32;
                for p in 0..inner {
                    s += at(&desc.a, desc.trans_a, i, p, a) * at(&desc.b, desc.trans_b, p, j, b);
                }
                if desc.bias {
                    s += bias[i];
                }
                let o = i + j * desc.d.ld as usize;
                d[o] = s + desc.beta * d[o];
            }
        }
    }

    /// Every transpose combination of the training products, described for cuBLASLt and
    /// computed as cuBLASLt would, equals the host's row-major product.
    #[test]
    fn training_products_equal_the_hosts_in_every_transpose() {
        use crate::engine::train::{Gemm as TGemm, T};
        let (m, n, k) = (5, 7, 3);
        let vals = |len: usize, s: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * s) % 17) as f32 / 4.0 - 2.0)
                .collect()
        };
        let t = |len: usize| T {
            buf: 0,
            off: 0,
            len,
        };
        for (ta, tb, acc, bias) in [
            (false, true, false, true),
            (false, false, false, false),
            (true, false, true, false),
            (true, true, true, true),
        ] {
            let (a, b, bv) = (vals(m * k, 5), vals(k * n, 7), vals(n, 3));
            let g = TGemm {
                d: t(m * n),
                a: t(m * k),
                ta,
                b: t(k * n),
                tb,
                m,
                n,
                k,
                bias: bias.then(|| t(n)),
                accumulate: acc,
            };
            let desc = describe_train(&g, Precision::F32, [DType::F32; 2]);
            let start = vals(m * n, 11);
            let mut host = start.clone();
            if bias {
                for r in host.chunks_mut(n) {
                    r.iter_mut()
                        .zip(&bv)
                        .for_each(|(v, b)| *v = if acc { *v + b } else { *b });
                }
            }
            crate::kernels::cpu::matmul_t(&mut host, &a, ta, &b, tb, [m, k, n], acc || bias);
            // D row-major [m, n] is column-major [n, m]: the same buffer.
            let mut lt = start.clone();
            column_major(&desc, &b, &a, &bv, &mut lt);
            for (i, (h, l)) in host.iter().zip(&lt).enumerate() {
                assert!(
                    (h - l).abs() < 1e-4,
                    "ta {ta} tb {tb}: element {i}: {h} vs {l}"
                );
            }
        }
        // The forward product is TN as the inference engine's.
        let fwd = describe_train(
            &TGemm {
                d: t(6),
                a: t(6),
                ta: false,
                b: t(9),
                tb: true,
                m: 2,
                n: 3,
                k: 3,
                bias: None,
                accumulate: false,
            },
            Precision::Tf32,
            [DType::F32; 2],
        );
        assert!(fwd.trans_a && !fwd.trans_b && fwd.compute == Compute::Tf32);
    }

    /// A bf16 step's products: bf16 operands with f32 sums into a bf16 or f32 output (the
    /// residual stream, a weight gradient); its f32 products in TF32.
    #[test]
    fn bf16_training_products_sum_in_f32() {
        use crate::engine::train::{Gemm as TGemm, T};
        let t = |len: usize| T {
            buf: 0,
            off: 0,
            len,
        };
        let g = TGemm {
            d: t(6),
            a: t(6),
            ta: true,
            b: t(9),
            tb: false,
            m: 2,
            n: 3,
            k: 3,
            bias: None,
            accumulate: true,
        };
        let grad = describe_train(&g, Precision::Bf16, [DType::Bf16, DType::F32]);
        assert_eq!(
            (grad.a.dtype, grad.b.dtype, grad.c.dtype, grad.d.dtype),
            (DType::Bf16, DType::Bf16, DType::F32, DType::F32)
        );
        assert_eq!((grad.compute, grad.beta), (Compute::F32, 1.0));
        let out = describe_train(&g, Precision::Bf16, [DType::Bf16; 2]);
        assert_eq!((out.c.dtype, out.d.dtype), (DType::Bf16, DType::Bf16));
        let f32s = describe_train(&g, Precision::Bf16, [DType::F32; 2]);
        assert_eq!(f32s.compute, Compute::Tf32);
        let fp32 = describe_train(&g, Precision::F32, [DType::F32; 2]);
        assert_eq!(fp32.compute, Compute::F32);
    }

    #[test]
    fn residual_products_accumulate_into_the_f32_stream() {
        let proj = Gemm {
            a: Act::Att,
            w: Linear::Proj(0),
            d: Act::X,
            accumulate: true,
            m: 64,
            n: 768,
            k: 768,
            bias: true,
        };
        let g = describe(&proj, Precision::Bf16);
        assert_eq!(
            (g.d.dtype, g.c.dtype, g.beta),
            (DType::F32, DType::F32, 1.0)
        );
        assert_eq!(g.b.dtype, DType::Bf16);
        let t = describe(&proj, Precision::Tf32);
        assert_eq!(
            (t.compute, t.a.dtype, t.b.dtype),
            (Compute::Tf32, DType::F32, DType::F32)
        );
        let f = describe(&proj, Precision::F32);
        assert_eq!(f.compute, Compute::F32);
    }
}
