//! Backend-specific code behind one door. The model's files call [`of`]`::<B>()` and the
//! [`Kernels`] it returns; nothing else in the model looks at which backend runs.
//!
//! [`Kernels`]' default methods are burn's generic ops. The CPU backend (`Flex`) overrides
//! attention, GELU and the whole transformer block with host kernels ([`cpu`]); under
//! autodiff on the CPU (`Autodiff<Flex>`) attention and GELU are single autodiff ops with their
//! own backward kernels ([`cpu_autodiff`]). CUDA (`cuda` feature) runs the products in the
//! chosen [`Precision`] ([`autocast`], `cuda`), and its autodiff trains attention as one
//! blocked op ([`attention_ad`]). Rust has no specialisation, so [`of`] picks the implementation
//! by the backend's type once per call; each override reaches its backend's primitive through
//! a downcast that cannot fail for the backend it was picked for.

pub mod attention_ad;
pub mod autocast;
pub mod bf16;
#[cfg(feature = "cubecl")]
pub mod cube;
pub mod cuda;
pub mod panels;
pub mod peak;

/// The precision of the matrix products (the four Linears of every block and attention's two
/// products). LayerNorm, softmax, GELU and residuals stay in f32 in every mode.
///
/// - `F32`: f32 operands, f32 sums (on CUDA through a CUDA-core matmul: burn's tensor-core
///   matmul rounds f32 operands to TF32 whenever the GPU has TF32).
/// - `Tf32`: f32 tensors, products on tensor cores with TF32 operands (10-bit mantissa) and
///   f32 sums: burn's own CUDA matmul. A GPU format: on the CPU it means f32.
/// - `Bf16`: bf16 operands with f32 sums (autocast: weights stay f32, operands are cast at
///   each product), as PyTorch's `autocast(dtype=torch.bfloat16)`. On the CPU it needs
///   AVX-512 BF16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    /// What `--precision` means when not given: f32 on the CPU (the reference's numbers to
    /// 3e-5); TF32 on a GPU (PyTorch's `allow_tf32` choice: features within about 1e-3 of f32
    /// at several times f32's speed).
    pub fn default_for(gpu: bool) -> Self {
        if gpu {
            Self::Tf32
        } else {
            Self::F32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "fp32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "tf32" => Ok(Self::Tf32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!(
                "unknown precision '{s}' (expected fp32, tf32 or bf16)"
            )),
        }
    }
}

static CPU_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set in the environment, bf16 runs on a CPU with AVX-512 BF16 but no AMX even where its
/// bf16 dot products are no faster than f32 FMAs, so bf16 is slower than f32 (for its numbers,
/// or to measure it).
pub const BF16_WITHOUT_AMX: &str = "MARLIN_BF16_WITHOUT_AMX";

/// Set in the environment, the CPU's bf16 dot products count as no faster than its f32 FMAs
/// whatever [`peak::bf16_dots_outrun_fmas`] measures (the Intel case, forced on any CPU: for
/// tests of the fallback).
pub const SLOW_BF16_DOTS: &str = "MARLIN_SLOW_BF16_DOTS";

/// Choose the CPU kernels' precision for this process. bf16 needs AVX-512 BF16: without it
/// the products stay in f32 and the returned note says so (one line for the user). With it,
/// bf16 runs on AMX tiles where the CPU has them, and otherwise on AVX-512 BF16 dot products
/// where those outrun f32 FMAs ([`peak::bf16_dots_outrun_fmas`]: AMD Zen 4 and later, where
/// ViT-B takes 1.19 s per clip in bf16 against 2.02 in f32 on 2 cores, BENCHMARKS.md). Where
/// they do not (Intel cores without AMX: one dot product per cycle against two FMAs, and the
/// conversions on top; 3.63 vs 2.23 s per clip on a 2-core Xeon), bf16 is slower than f32, so
/// f32 runs, with a note, unless [`BF16_WITHOUT_AMX`] is set. TF32 is a GPU format, f32 on
/// the CPU.
pub fn set_cpu_precision(p: Precision) -> (Precision, Option<String>) {
    let (effective, note) = cpu_effective_precision(p);
    CPU_BF16.store(
        effective == Precision::Bf16,
        std::sync::atomic::Ordering::Relaxed,
    );
    (effective, note)
}

/// The precision the CPU's kernels compute in when `p` is asked for (as
/// [`set_cpu_precision`] decides, without setting anything): an engine keeps its own.
pub fn cpu_effective_precision(p: Precision) -> (Precision, Option<String>) {
    let env = |k: &str| std::env::var_os(k).is_some();
    let (effective, note) = match p {
        Precision::Bf16 if !bf16::supported() => (
            Precision::F32,
            Some("this CPU has no AVX-512 BF16 instructions: computing in f32 instead".to_string()),
        ),
        Precision::Bf16
            if !bf16::amx_available()
                && !env(BF16_WITHOUT_AMX)
                && (env(SLOW_BF16_DOTS) || !peak::bf16_dots_outrun_fmas()) =>
        {
            (
                Precision::F32,
                Some(format!(
                    "this CPU has no AMX and its bf16 dot products are no faster than f32 \
                     FMAs: bf16 is slower than f32 here, computing in f32 instead (set \
                     {BF16_WITHOUT_AMX}=1 for bf16 anyway)"
                )),
            )
        }
        Precision::Tf32 => (
            Precision::F32,
            Some("TF32 is a GPU format: computing in f32 on the CPU".to_string()),
        ),
        p => (p, None),
    };
    (effective, note)
}

/// The CPU kernels' precision (f32 unless [`set_cpu_precision`] chose bf16).
pub fn cpu_precision() -> Precision {
    if CPU_BF16.load(std::sync::atomic::Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// 0: not set (the GPU default), 1: f32, 2: tf32, 3: bf16.
static GPU_PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Choose the GPU kernels' precision for this process (every mode runs on every CUDA GPU
/// burn supports; TF32 and bf16 need tensor cores to be fast: Ampere or newer).
pub fn set_gpu_precision(p: Precision) {
    let v = match p {
        Precision::F32 => 1,
        Precision::Tf32 => 2,
        Precision::Bf16 => 3,
    };
    GPU_PRECISION.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The GPU kernels' precision ([`Precision::default_for`] a GPU unless
/// [`set_gpu_precision`] chose another).
pub fn gpu_precision() -> Precision {
    gpu_precision_set().unwrap_or(Precision::default_for(true))
}

/// The precision [`set_gpu_precision`] chose, if any.
pub fn gpu_precision_set() -> Option<Precision> {
    match GPU_PRECISION.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Some(Precision::F32),
        2 => Some(Precision::Tf32),
        3 => Some(Precision::Bf16),
        _ => None,
    }
}

/// 0: not set (read `MARLIN_FLASH_ATTENTION` once), 1: off, 2: on.
static FLASH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether attention may take burn's fused (flash) kernel on backends that have one: on unless
/// [`set_flash_attention`]`(false)` or the environment says `MARLIN_FLASH_ATTENTION=0`.
pub fn flash_attention() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match FLASH.load(Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("MARLIN_FLASH_ATTENTION").map_or(true, |v| v != "0");
            FLASH.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
    }
}

/// Let attention take burn's fused kernel (the default) or keep it on the unfused ops.
pub fn set_flash_attention(on: bool) {
    FLASH.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

pub mod cpu;
pub mod cpu_autodiff;
pub mod cpu_train;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::any::{Any, TypeId};

/// The operations a backend may do its own way. Every method has burn's generic default.
pub trait Kernels<B: Backend>: Sync {
    /// Which implementation this is, for reports.
    fn name(&self) -> &'static str {
        "generic"
    }

    /// Multi-head attention from the fused projection `[B, N, 3 * D]` (q, k, v; `heads` heads
    /// of `D / heads`) to `[B, N, D]`, the layout the output projection takes.
    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        generic_attention(qkv, heads, scale)
    }

    /// A Linear's product `x [B, N, in] · w [in, out] (+ b [out])`.
    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        burn::tensor::module::linear(x, w, b)
    }

    /// Exact (erf) GELU.
    fn gelu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        burn::tensor::activation::gelu(x)
    }

    /// A 2-D convolution `x [B, C, H, W]`, `w [O, C / groups, kh, kw]` (+ `b [O]`): the face
    /// networks' (MTCNN, the face mesh, the selfie mask).
    fn conv2d(
        &self,
        x: Tensor<B, 4>,
        w: Tensor<B, 4>,
        b: Option<Tensor<B, 1>>,
        options: burn::tensor::ops::ConvOptions<2>,
    ) -> Tensor<B, 4> {
        burn::tensor::module::conv2d(x, w, b, options)
    }

    /// Tubelets of a clip `[B, C, T, H, W]` as tokens `[B, N, C*tubelet*patch*patch]`: tokens
    /// in (t, h, w) order, values in (c, pt, ph, pw) order (see `model::patch_embed`).
    fn patchify(&self, x: Tensor<B, 5>, tubelet: usize, patch: usize) -> Tensor<B, 3> {
        generic_patchify(x, tubelet, patch)
    }

    /// A whole pre-norm block `[B, N, D] -> [B, N, D]` in one kernel, or `x` back untouched to
    /// run the block op by op. `block` hands over its weights only if an override asks.
    fn block(
        &self,
        _block: &dyn PreNormBlock<B>,
        x: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        Err(x)
    }
}

/// A pre-norm transformer block as the door's [`Kernels::block`] sees it (the model's block
/// implements it; the kernels sit below the model and never name its types).
pub trait PreNormBlock<B: Backend> {
    /// The block's weights, or `None` where it has a part a one-kernel block does not do
    /// (layer scale, a qkv Linear with a bias of its own).
    fn tensors(&self) -> Option<BlockTensors<B>>;
}

/// A Linear's weight `[in, out]` and bias `[out]`.
pub type LinearTensors<B> = (Tensor<B, 2>, Option<Tensor<B, 1>>);

/// The weights of one pre-norm block without layer scale:
/// x += proj(attn(LN1(x))); x += fc2(GELU(fc1(LN2(x)))).
pub struct BlockTensors<B: Backend> {
    /// LayerNorm 1 (weight, bias) `[D]`.
    pub norm1: (Tensor<B, 1>, Tensor<B, 1>),
    /// qkv projection `[D, 3D]` (no bias of its own).
    pub qkv: Tensor<B, 2>,
    /// q_bias and v_bias `[D]` (k has none).
    pub qv_bias: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    /// Output projection `[D, D]`.
    pub proj: LinearTensors<B>,
    /// LayerNorm 2 (weight, bias) `[D]`.
    pub norm2: (Tensor<B, 1>, Tensor<B, 1>),
    /// MLP `[D, Hid]` and `[Hid, D]`.
    pub fc1: LinearTensors<B>,
    pub fc2: LinearTensors<B>,
    pub heads: usize,
    /// Scale of q·k.
    pub scale: f32,
    /// LayerNorm epsilon.
    pub eps: f32,
}

/// Burn's generic ops: every backend without an override.
pub struct Generic;
impl<B: Backend> Kernels<B> for Generic {}

/// The CPU backend (`Flex`): host kernels for the ops burn-flex 0.21 runs on one thread.
pub struct FlexKernels;

/// Autodiff on the CPU backend: attention and GELU as single ops with their own backward.
pub struct FlexAutodiffKernels;

/// The kernels of backend `B`.
pub fn of<B: Backend>() -> &'static dyn Kernels<B> {
    let t = TypeId::of::<B>();
    if t == TypeId::of::<Flex>() {
        &FlexKernels
    } else if t == TypeId::of::<Autodiff<Flex>>() {
        &FlexAutodiffKernels
    } else {
        #[cfg(feature = "cubecl")]
        if let Some(k) = cube::kernels_of::<B>() {
            return k;
        }
        &Generic
    }
}

/// [`Kernels::patchify`] with burn's ops: an 8-d reshape, permute and copy.
pub fn generic_patchify<B: Backend>(x: Tensor<B, 5>, tubelet: usize, patch: usize) -> Tensor<B, 3> {
    let [b, c, t, h, w] = x.dims();
    let (nt, nh, nw) = (t / tubelet, h / patch, w / patch);
    x.reshape([b, c, nt, tubelet, nh, patch, nw, patch])
        .permute([0, 2, 4, 6, 1, 3, 5, 7])
        .reshape([b, nt * nh * nw, c * tubelet * patch * patch])
}

/// burn's attention op on the fused projection, in f32.
pub fn generic_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
    autocast::attention_qkv(qkv, heads, scale, Precision::F32)
}

impl<B: Backend> Kernels<B> for FlexAutodiffKernels {
    fn name(&self) -> &'static str {
        "flex-autodiff"
    }

    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        cpu_autodiff::attention(qkv, heads, scale)
            .unwrap_or_else(|qkv| generic_attention(qkv, heads, scale))
    }

    fn gelu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        cpu_autodiff::gelu(x).unwrap_or_else(burn::tensor::activation::gelu)
    }
}

impl<B: Backend> Kernels<B> for FlexKernels {
    fn name(&self) -> &'static str {
        "flex"
    }

    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        let [b, n, d3] = qkv.dims();
        let d = d3 / 3;
        let device = qkv.device();
        match qkv.clone().into_data().into_vec::<f32>() {
            Ok(data) => {
                // The precision of the fused block ([`cpu::block_forward`]), so a block run op by
                // op (and `marlin bench --profile`) computes as the fused one does.
                let out = match cpu_precision() {
                    Precision::Bf16 => cpu::attention_bf16(&data, b, n, heads, d / heads, scale),
                    _ => cpu::attention(&data, b, n, heads, d / heads, scale),
                };
                Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
            }
            // Not f32: burn's op.
            Err(_) => generic_attention(qkv, heads, scale),
        }
    }

    /// burn-flex walks the 8-d permute value by value on one thread (1-2% of a ViT-B clip):
    /// [`cpu::patchify`] copies runs of `patch` values, in parallel.
    fn patchify(&self, x: Tensor<B, 5>, tubelet: usize, patch: usize) -> Tensor<B, 3> {
        let [b, c, t, h, w] = x.dims();
        let device = x.device();
        match x.clone().into_data().into_vec::<f32>() {
            Ok(v) => {
                let n = (t / tubelet) * (h / patch) * (w / patch);
                let out = cpu::patchify(&v, [b, c, t, h, w], tubelet, patch);
                Tensor::from_data(
                    TensorData::new(out, [b, n, c * tubelet * patch * patch]),
                    &device,
                )
            }
            // Not f32: burn's ops.
            Err(_) => generic_patchify(x, tubelet, patch),
        }
    }

    /// burn's product in f32; in bf16 (`--precision bf16`) the host bf16 product of the fused
    /// block from the weight's kept panels ([`bf16::matmul_panels`]), so a block run op by op
    /// computes as the fused one does.
    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        if cpu_precision() != Precision::Bf16 {
            return burn::tensor::module::linear(x, w, b);
        }
        let ([bb, n, k], [_, out]) = (x.dims(), w.dims());
        let device = x.device();
        let host = |d: TensorData| d.into_vec::<f32>().ok();
        // The weight's panels packed once, as the fused block keeps them.
        let panels = flex(w.clone()).and_then(|t| flex_panels(&t));
        let wv = match panels {
            Some(_) => Some(Vec::new()),
            None => host(w.clone().into_data()),
        };
        let (Some(xv), Some(wv)) = (host(x.clone().into_data()), wv) else {
            // Not f32: burn's op.
            return burn::tensor::module::linear(x, w, b);
        };
        let mut y = vec![0f32; bb * n * out];
        match panels {
            Some(bp) => bf16::matmul_panels(&mut y, &xv, &bp, [bb * n, k, out], false),
            None => bf16::matmul(&mut y, &xv, &wv, [bb * n, k, out], false),
        }
        let y = Tensor::<B, 3>::from_data(TensorData::new(y, [bb, n, out]), &device);
        match b {
            Some(b) => y + b.unsqueeze::<3>(),
            None => y,
        }
    }

    fn gelu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // burn-flex's GELU is scalar and single-threaded: ours is neither.
        let dims = x.dims();
        let device = x.device();
        match x.clone().into_data().into_vec::<f32>() {
            Ok(mut v) => {
                cpu::gelu_in_place(&mut v);
                Tensor::from_data(TensorData::new(v, dims), &device)
            }
            Err(_) => burn::tensor::activation::gelu(x),
        }
    }

    /// The whole block as one host kernel ([`cpu::block_forward`]), reading the weights in
    /// place; not for layer scale or a qkv Linear with a bias of its own.
    fn block(
        &self,
        blk: &dyn PreNormBlock<B>,
        x: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        if x.dtype() != burn::tensor::DType::F32 {
            return Err(x);
        }
        let Some(t) = blk.tensors() else {
            return Err(x);
        };
        let pair = |(a, b): (Tensor<B, 1>, Tensor<B, 1>)| Some((flex(a)?, flex(b)?));
        let held = (|| {
            Some((
                pair(t.norm1)?,
                flex(t.qkv)?,
                match t.qv_bias {
                    Some(p) => Some(pair(p)?),
                    None => None,
                },
                (flex(t.proj.0)?, flex(t.proj.1?)?),
                pair(t.norm2)?,
                (flex(t.fc1.0)?, flex(t.fc1.1?)?),
                (flex(t.fc2.0)?, flex(t.fc2.1?)?),
            ))
        })();
        let Some((n1, qkv, qv, proj, n2, fc1, fc2)) = held else {
            return Err(x);
        };
        fn sl(t: &FlexTensor) -> Option<&[f32]> {
            t.as_slice::<f32>()
        }
        fn pair_sl((a, b): &(FlexTensor, FlexTensor)) -> Option<(&[f32], &[f32])> {
            Some((sl(a)?, sl(b)?))
        }
        // bf16: the Linears' weights packed once, kept while their storage lives.
        let bf16_panels = (cpu_precision() == Precision::Bf16)
            .then(|| {
                Some([
                    flex_panels(&qkv)?,
                    flex_panels(&proj.0)?,
                    flex_panels(&fc1.0)?,
                    flex_panels(&fc2.0)?,
                ])
            })
            .flatten();
        let w = (|| {
            Some(cpu::BlockWeights {
                norm1: pair_sl(&n1)?,
                qkv: sl(&qkv)?,
                qv_bias: match &qv {
                    Some(p) => Some(pair_sl(p)?),
                    None => None,
                },
                proj: pair_sl(&proj)?,
                norm2: pair_sl(&n2)?,
                fc1: pair_sl(&fc1)?,
                fc2: pair_sl(&fc2)?,
                heads: t.heads,
                scale: t.scale,
                eps: t.eps,
                bf16_panels,
            })
        })();
        let Some(w) = w else {
            return Err(x);
        };
        let [b, n, d] = x.dims();
        let device = x.device();
        // An f32 tensor (checked above) always converts to Vec<f32>.
        let Ok(mut data) = x.into_data().into_vec::<f32>() else {
            unreachable!("f32 tensor data")
        };
        cpu::block_forward(&mut data, b, n, d, &w);
        Ok(Tensor::from_data(
            burn::tensor::TensorData::new(data, [b, n, d]),
            &device,
        ))
    }
}

/// A 2-d f32 weight `[k, n]` of the CPU backend packed for bf16 products, once per weight
/// ([`bf16::cached_panels`], keyed by the tensor's copy-on-write storage); None for a weight
/// that is not a plain contiguous f32 matrix.
fn flex_panels(w: &FlexTensor) -> Option<std::sync::Arc<Vec<u32>>> {
    if w.layout().num_dims() != 2 {
        return None;
    }
    let [k, n] = w.layout().shape().dims::<2>();
    let values = w.as_slice::<f32>()?;
    let owner: bf16::Owner = w.data_arc();
    Some(bf16::cached_panels(&owner, values, k, n))
}

/// The Flex tensor behind `t` (a refcount, no copy) when `B` is the plain CPU backend.
fn flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<FlexTensor> {
    primitive_as::<B, FlexTensor, D>(t).ok()
}

/// The float primitive of `t` as `P` when that is `B`'s primitive type (how an override
/// reaches its own backend's tensor), or `t` back untouched.
pub(crate) fn primitive_as<B: Backend, P: 'static, const D: usize>(
    t: Tensor<B, D>,
) -> Result<P, Tensor<B, D>> {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    match boxed.downcast::<P>() {
        Ok(p) => Ok(*p),
        Err(boxed) => {
            // The box holds the B primitive it was made from.
            let p = *boxed
                .downcast::<B::FloatTensorPrimitive>()
                .expect("the primitive it was built from");
            Err(Tensor::from_primitive(
                burn::tensor::TensorPrimitive::Float(p),
            ))
        }
    }
}

/// The `B` tensor of `p`, which is `B`'s float primitive (the caller's [`primitive_as`]
/// checked the type).
pub(crate) fn from_primitive_as<B: Backend, P: 'static, const D: usize>(p: P) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = Box::new(p);
    let p = *boxed
        .downcast::<B::FloatTensorPrimitive>()
        .expect("P is B's float primitive");
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<B: Backend>(shape: [usize; 3]) -> Tensor<B, 3> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn diff<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let (a, b) = (crate::util::check::values(a), crate::util::check::values(b));
        crate::util::check::max_abs_diff(&a, &b)
    }

    /// Each backend's overrides agree with burn's generic ops (2 clips, 50 tokens, 4 heads).
    #[test]
    fn overrides_equal_the_generic_ops() {
        fn check<B: Backend>() {
            let k = of::<B>();
            let qkv = input::<B>([2, 50, 96]);
            let a = diff(
                k.attention(qkv.clone(), 4, 0.2),
                generic_attention(qkv, 4, 0.2),
            );
            let x = input::<B>([2, 50, 32]);
            let g = diff(k.gelu(x.clone()), burn::tensor::activation::gelu(x));
            assert!(a <= 1e-5 && g <= 1e-5, "attention {a}, gelu {g}");
            // Tubelets of 2 x 4 x 4 from a [2, 3, 6, 8, 12] clip: a copy, so equal to the bit.
            let clip = input::<B>([2, 3, 576]).reshape([2, 3, 6, 8, 12]);
            let (got, want) = (
                crate::util::check::values(k.patchify(clip.clone(), 2, 4)),
                crate::util::check::values(generic_patchify(clip, 2, 4)),
            );
            assert_eq!(got, want, "patchify");
        }
        check::<Flex>();
        check::<Autodiff<Flex>>();
    }

    /// A weight's cached bf16 panels are its values' panels, and after burn changes a tensor
    /// in place (an op on the only handle to it) the panels are the new values', never the
    /// old ones.
    #[test]
    fn cached_weight_panels_follow_the_tensor() {
        let device = Default::default();
        let (k, n) = (24, 40);
        let values: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(values.clone(), [k, n]), &device);
        let first = flex_panels(&flex(w.clone()).unwrap()).unwrap();
        assert_eq!(*first, bf16::panels(&values, k, n));
        let again = flex_panels(&flex(w.clone()).unwrap()).unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &again), "packed twice");
        // `w` is the only handle now: burn-flex adds in place where it can.
        let w = w.add_scalar(1.0);
        let changed: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
        let after = flex_panels(&flex(w.clone()).unwrap()).unwrap();
        assert_eq!(*after, bf16::panels(&changed, k, n), "stale panels");
        // Not a matrix: no panels.
        assert!(flex_panels(&flex(w.reshape([k * n])).unwrap()).is_none());
    }

    #[test]
    fn precisions_parse_and_default_per_device() {
        for (s, p) in [
            ("fp32", Precision::F32),
            ("f32", Precision::F32),
            ("tf32", Precision::Tf32),
            ("bf16", Precision::Bf16),
        ] {
            assert_eq!(s.parse::<Precision>(), Ok(p));
        }
        assert!("fp8"
            .parse::<Precision>()
            .unwrap_err()
            .contains("expected fp32, tf32 or bf16"));
        assert_eq!(Precision::default_for(false), Precision::F32);
        assert_eq!(Precision::default_for(true), Precision::Tf32);
        assert_eq!(Precision::Tf32.to_string(), "tf32");
        // TF32 is a GPU format: the CPU computes in f32 and says so.
        let (p, note) = set_cpu_precision(Precision::Tf32);
        assert_eq!(p, Precision::F32);
        assert!(note.is_some_and(|n| n.contains("GPU format")));
    }

    #[test]
    fn the_door_picks_each_backends_kernels() {
        fn name<B: Backend>() -> &'static str {
            of::<B>().name()
        }
        assert_eq!(name::<Flex>(), "flex");
        assert_eq!(name::<Autodiff<Flex>>(), "flex-autodiff");
        assert_eq!(name::<Autodiff<Autodiff<Flex>>>(), "generic");
    }
}
