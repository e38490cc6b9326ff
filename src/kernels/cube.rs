//! The GPU backends' kernels, one code path for every CubeCL runtime: burn's fusion over the
//! CubeCL backend (`Cuda`; `Vulkan`/`Metal` through wgpu) and its autodiff.
//!
//! In TF32 and bf16 the products are burn's ([`super::autocast`]): its matmul (tensor cores
//! where the device has them) and, for attention, its flash-attention kernel (autotuned against
//! the unfused one). cubek-attention 0.2's flash routines hold the Q/K/V and softmax tiles in
//! f16 with f32 sums: that is what attention in "tf32" and "bf16" means on a GPU.
//!
//! In f32 the products are a register-tile matmul: burn 0.21's CUDA matmul (`cubek-matmul`'s
//! `adjust_dtypes`) stages f32 operands as TF32 whenever the kernel it picks runs on tensor
//! cores and the GPU has TF32, with no switch to turn that off, so `--precision fp32` would
//! silently be TF32. Here each product is a fusion custom operation that hands the CubeCL
//! tensors to `cubek-matmul`'s `SimpleUnit` routine (register tiles, f32 operands and sums),
//! the way burn's own vision ops reach their kernels from a fused backend. Under autodiff the
//! same product is one op whose backward takes the same f32 products, and attention is one op
//! in blocks of query rows ([`super::attention_ad`]) in every precision.
//!
//! Nothing here names a runtime but [`kernels_of`], which maps each backend type of this build
//! to its kernels.

use super::{autocast, from_primitive_as, primitive_as, Kernels, Precision};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use std::any::TypeId;
use std::marker::PhantomData;

/// The backend under the fusion layer.
type Inner<R> = CubeBackend<R, f32, i32, u8>;
type Rt<R> = <Inner<R> as FusionBackend>::FusionRuntime;
type GpuTensor<R> = FusionTensor<Rt<R>>;
/// The GPU backend of runtime `R`: burn's `Cuda`, `Vulkan` and `Metal` are this type.
pub type Fused<R> = Fusion<Inner<R>>;
type AdTensor<R> = burn::tensor::ops::FloatTensor<Autodiff<Fused<R>>>;

/// `Fused<R>`: f32 products on register tiles, TF32/bf16 through [`autocast`].
pub struct CubeKernels<R> {
    name: &'static str,
    /// The runtime has TF32 (CUDA), and takes it by default as PyTorch's `allow_tf32`.
    tf32: bool,
    runtime: PhantomData<fn() -> R>,
}

/// `Autodiff<Fused<R>>`: as [`CubeKernels`], with the f32 product as an autodiff op.
pub struct CubeAutodiffKernels<R> {
    name: &'static str,
    tf32: bool,
    runtime: PhantomData<fn() -> R>,
}

/// The precision the products of a tensor on `device` take: the one set
/// ([`super::set_gpu_precision`]) or the runtime's default, as far as the device has it (TF32
/// only where the runtime has TF32, bf16 only where the device computes in bf16; f32
/// otherwise). The CLI says so in a note when it sets the precision.
fn precision<B: Backend>(tf32: bool, device: &B::Device) -> Precision {
    match super::gpu_precision_set() {
        None if tf32 => Precision::Tf32,
        None => Precision::F32,
        Some(Precision::Tf32) if !tf32 => Precision::F32,
        Some(Precision::Bf16) if !B::supports_dtype(device, DType::BF16) => Precision::F32,
        Some(p) => p,
    }
}

/// The kernels of `B` when it is a GPU backend of this build (or its autodiff).
pub fn kernels_of<B: Backend>() -> Option<&'static dyn Kernels<B>> {
    let t = TypeId::of::<B>();
    #[cfg(feature = "cuda")]
    {
        use burn_cubecl::cubecl::cuda::CudaRuntime;
        if t == TypeId::of::<Fused<CudaRuntime>>() {
            return Some(&CubeKernels::<CudaRuntime> {
                name: "cuda",
                tf32: true,
                runtime: PhantomData,
            });
        }
        if t == TypeId::of::<Autodiff<Fused<CudaRuntime>>>() {
            return Some(&CubeAutodiffKernels::<CudaRuntime> {
                name: "cuda-autodiff",
                tf32: true,
                runtime: PhantomData,
            });
        }
    }
    #[cfg(any(feature = "vulkan", feature = "metal"))]
    {
        use burn::backend::wgpu::WgpuRuntime;
        if t == TypeId::of::<Fused<WgpuRuntime>>() {
            return Some(&CubeKernels::<WgpuRuntime> {
                name: "wgpu",
                tf32: false,
                runtime: PhantomData,
            });
        }
        if t == TypeId::of::<Autodiff<Fused<WgpuRuntime>>>() {
            return Some(&CubeAutodiffKernels::<WgpuRuntime> {
                name: "wgpu-autodiff",
                tf32: false,
                runtime: PhantomData,
            });
        }
    }
    let _ = t;
    None
}

/// Bytes of one block of attention scores: [`super::attention_ad::BLOCK_BYTES`], or less where
/// the device's largest buffer is smaller (wgpu binds at most `max_storage_buffer_binding_size`
/// in one buffer, 128 MiB on many adapters and on lavapipe; ViT-B's whole `[B*H, N, N]` score
/// matrix at batch 2 is 236 MB).
fn block_budget<R: CubeRuntime, B: Backend>(device: &B::Device) -> usize {
    let any: &dyn std::any::Any = device;
    match any.downcast_ref::<R::Device>() {
        Some(d) => {
            let max = R::client(d).properties().memory.max_page_size;
            super::attention_ad::BLOCK_BYTES.min(usize::try_from(max).unwrap_or(usize::MAX))
        }
        None => super::attention_ad::BLOCK_BYTES,
    }
}

impl<R: CubeRuntime, B: Backend> Kernels<B> for CubeKernels<R> {
    fn name(&self) -> &'static str {
        self.name
    }

    /// fp32: in blocks of query rows ([`super::attention_ad::Blocked`]) with both products on
    /// register tiles; tf32/bf16 on CUDA: burn's attention (its flash kernel). On wgpu every
    /// precision takes the blocked op: burn's unfused attention, which its autotune tries,
    /// holds the whole `[B, H, N, N]` score matrix, over wgpu's largest buffer from batch 2 of
    /// ViT-B on.
    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        let mm: super::attention_ad::Matmul<B> = match precision::<B>(self.tf32, &qkv.device()) {
            Precision::F32 => matmul_f32::<R, B>,
            p if self.tf32 => return autocast::attention_qkv(qkv, heads, scale, p),
            Precision::Tf32 => |a, b| a.matmul(b),
            Precision::Bf16 => |a, b| {
                a.cast(DType::BF16)
                    .matmul(b.cast(DType::BF16))
                    .cast(DType::F32)
            },
        };
        let blocked = super::attention_ad::Blocked::<B> {
            heads,
            scale,
            mm,
            budget: block_budget::<R, B>(&qkv.device()),
        };
        blocked.forward(qkv).0
    }

    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        match precision::<B>(self.tf32, &x.device()) {
            Precision::F32 => linear_f32(x, w, b, matmul_f32::<R, B>),
            p => autocast::linear(x, w, b, p),
        }
    }

    /// In f32, a dense convolution (one group, no dilation) is the f32 product over its
    /// patches ([`conv2d_as_product`]): burn's GPU convolution is an implicit matmul on tensor
    /// cores, TF32 on CUDA whatever the precision (found on an H200: the face mesh's landmarks
    /// 2e-2 px off TFLite's in "fp32"). Depthwise ones do no product and stay burn's.
    fn conv2d(
        &self,
        x: Tensor<B, 4>,
        w: Tensor<B, 4>,
        b: Option<Tensor<B, 1>>,
        options: burn::tensor::ops::ConvOptions<2>,
    ) -> Tensor<B, 4> {
        let dense = options.groups == 1 && options.dilation == [1, 1];
        match precision::<B>(self.tf32, &x.device()) {
            Precision::F32 if dense => conv2d_as_product(x, w, b, options, |x, w, b| {
                linear_f32(x, w, b, matmul_f32::<R, B>)
            }),
            _ => burn::tensor::module::conv2d(x, w, b, options),
        }
    }
}

/// A dense 2-D convolution as one product: each output pixel's `C * kh * kw` input patch
/// (strided slices of the padded input, one per kernel offset, stacked in the weight's
/// `[C, kh, kw]` order) times the weight `[C * kh * kw, O]`, by `linear`.
pub fn conv2d_as_product<B: Backend>(
    x: Tensor<B, 4>,
    w: Tensor<B, 4>,
    b: Option<Tensor<B, 1>>,
    options: burn::tensor::ops::ConvOptions<2>,
    linear: impl Fn(Tensor<B, 3>, Tensor<B, 2>, Option<Tensor<B, 1>>) -> Tensor<B, 3>,
) -> Tensor<B, 4> {
    use burn::tensor::ops::PadMode;
    use burn::tensor::Slice;
    let [bs, c, h, wd] = x.dims();
    let [o, _, kh, kw] = w.dims();
    let ([sh, sw], [ph, pw]) = (options.stride, options.padding);
    let x = if ph > 0 || pw > 0 {
        x.pad((pw, pw, ph, ph), PadMode::Constant(0.0))
    } else {
        x
    };
    let (oh, ow) = ((h + 2 * ph - kh) / sh + 1, (wd + 2 * pw - kw) / sw + 1);
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let rows = Slice::new(
                i as isize,
                Some((i + sh * (oh - 1) + 1) as isize),
                sh as isize,
            );
            let cols = Slice::new(
                j as isize,
                Some((j + sw * (ow - 1) + 1) as isize),
                sw as isize,
            );
            taps.push(x.clone().slice([Slice::full(), Slice::full(), rows, cols]));
        }
    }
    // [B, C, kh*kw, oh, ow] -> [B, oh*ow, C*kh*kw]
    let patches = Tensor::stack::<5>(taps, 2)
        .reshape([bs, c * kh * kw, oh * ow])
        .swap_dims(1, 2);
    let wt = w.reshape([o, c * kh * kw]).transpose();
    linear(patches, wt, b)
        .swap_dims(1, 2)
        .reshape([bs, o, oh, ow])
}

impl<R: CubeRuntime, B: Backend> Kernels<B> for CubeAutodiffKernels<R> {
    fn name(&self) -> &'static str {
        self.name
    }

    /// One autodiff op in blocks of query rows ([`super::attention_ad`]): no `[B, H, N, N]`
    /// matrix is kept for backward.
    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        let mm: super::attention_ad::Matmul<Fused<R>> =
            match precision::<B>(self.tf32, &qkv.device()) {
                Precision::F32 => matmul_f32::<R, Fused<R>>,
                Precision::Tf32 => |a, b| a.matmul(b),
                Precision::Bf16 => |a, b| {
                    a.cast(DType::BF16)
                        .matmul(b.cast(DType::BF16))
                        .cast(DType::F32)
                },
            };
        let budget = block_budget::<R, B>(&qkv.device());
        // B is Autodiff<Fused<R>> (the door picks these kernels by type): never handed back.
        super::attention_ad::attention::<B, Fused<R>>(qkv, heads, scale, mm, budget)
            .unwrap_or_else(|qkv| super::generic_attention(qkv, heads, scale))
    }

    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        match precision::<B>(self.tf32, &x.device()) {
            Precision::F32 => linear_f32(x, w, b, matmul_f32_ad::<R, B>),
            p => autocast::linear(x, w, b, p),
        }
    }

    /// The exact GELU as `x · (1 + erf(x / √2)) / 2` in differentiable ops, so its gradient is
    /// the exact one, `Φ(x) + x·φ(x)` (through erf's backward). burn 0.21's `gelu` op takes the
    /// erf GELU forward but the default `gelu_backward`, which every CubeCL backend uses, is the
    /// derivative of the tanh approximation: off by up to about 1e-3 of each gradient (found on
    /// lavapipe by the reconstruction-gradient test). Fusion fuses the element-wise ops.
    fn gelu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let erf = (x.clone() * std::f32::consts::FRAC_1_SQRT_2).erf();
        x * (erf + 1.0) * 0.5
    }
}

/// `x [B, N, in] · w [in, out] + b` as one `[1, B*N, in] · [1, in, out]` product.
fn linear_f32<B: Backend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
    mm: super::attention_ad::Matmul<B>,
) -> Tensor<B, 3> {
    let [bs, n, d] = x.dims();
    let out = w.dims()[1];
    let y = mm(x.reshape([1, bs * n, d]), w.unsqueeze::<3>()).reshape([bs, n, out]);
    match b {
        Some(b) => y + b.unsqueeze::<3>(),
        None => y,
    }
}

/// `a [b, m, k] · c [b, k, n]` in f32 on register tiles when `B` is `Fused<R>` and both are
/// f32; burn's matmul otherwise.
pub fn matmul_f32<R: CubeRuntime, B: Backend>(a: Tensor<B, 3>, c: Tensor<B, 3>) -> Tensor<B, 3> {
    if a.dtype() != DType::F32 || c.dtype() != DType::F32 {
        return a.matmul(c);
    }
    match (
        primitive_as::<B, GpuTensor<R>, 3>(a),
        primitive_as::<B, GpuTensor<R>, 3>(c),
    ) {
        (Ok(a), Ok(c)) => from_primitive_as::<B, _, 3>(matmul_f32_fused::<R>(a, c)),
        (a, c) => {
            let back = |r: Result<GpuTensor<R>, Tensor<B, 3>>| match r {
                Ok(p) => from_primitive_as::<B, _, 3>(p),
                Err(t) => t,
            };
            back(a).matmul(back(c))
        }
    }
}

/// The custom fusion operation of [`matmul_f32`].
fn matmul_f32_fused<R: CubeRuntime>(a: GpuTensor<R>, c: GpuTensor<R>) -> GpuTensor<R> {
    struct MatmulF32<R> {
        desc: CustomOpIr,
        runtime: PhantomData<fn() -> R>,
    }

    impl<R> std::fmt::Debug for MatmulF32<R> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MatmulF32")
                .field("desc", &self.desc)
                .finish()
        }
    }

    impl<R: CubeRuntime> Operation<Rt<R>> for MatmulF32<R> {
        fn execute(&self, handles: &mut HandleContainer<<Rt<R> as FusionRuntime>::FusionHandle>) {
            let ([a, c], [out]) = self.desc.as_fixed();
            let a = handles.get_float_tensor::<Inner<R>>(a);
            let c = handles.get_float_tensor::<Inner<R>>(c);
            handles.register_float_tensor::<Inner<R>>(&out.id, unit_matmul::<R>(a, c));
        }
    }

    let (sa, sc) = (a.shape.clone(), c.shape.clone());
    let client = a.client.clone();
    let streams = OperationStreams::with_inputs([&a, &c]);
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new([sa[0].max(sc[0]), sa[1], sc[2]]),
        DType::F32,
    );
    let desc = CustomOpIr::new("marlin_matmul_f32", &[a.into_ir(), c.into_ir()], &[out]);
    client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            MatmulF32::<R> {
                desc,
                runtime: PhantomData,
            },
        )
        .output()
}

/// `cubek-matmul`'s register-tile (CUDA core) routine: f32 operands, f32 sums. Its naive
/// kernel (also f32) if the routine cannot take the shapes.
fn unit_matmul<R: CubeRuntime>(a: CubeTensor<R>, c: CubeTensor<R>) -> CubeTensor<R> {
    use burn_cubecl::kernel::{into_contiguous, matmul::init_matmul_output};
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::{launch_ref, Strategy};
    use cubek::std::InputBinding;
    let (a, c) = (into_contiguous(a), into_contiguous(c));
    let out = init_matmul_output(&a, &c, DType::F32);
    let run = |strategy: &Strategy| {
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: a.dtype.into(),
            rhs: c.dtype.into(),
            out: out.dtype.into(),
        });
        launch_ref(
            strategy,
            &out.client,
            InputBinding::new(a.clone().binding(), a.dtype.into()),
            InputBinding::new(c.clone().binding(), c.dtype.into()),
            out.clone().binding(),
            &mut dtypes,
        )
    };
    // SimpleUnit, not DoubleUnit: cubek-matmul 0.2's double-buffered unit routine returns wrong
    // products for a batch of more than one matrix with an inner size of 24 (attention's
    // q·kᵀ with 24-wide heads, [8, 50, 24]·[8, 24, 50]: max abs error 0.55; found on lavapipe by
    // the `products_match_the_cpu` test), while SimpleUnit agrees with the CPU on every shape.
    if run(&Strategy::SimpleUnit(Default::default())).is_err() {
        // The naive kernel takes every shape; a failure here is a bug in the kernel library.
        run(&Strategy::Naive).expect("the naive f32 matmul launches");
    }
    out
}

/// [`matmul_f32`] for `Autodiff<Fused<R>>`: one op whose backward is two f32 products
/// (`dA = dC · Cᵀ`, `dC_in = Aᵀ · dC`).
pub fn matmul_f32_ad<R: CubeRuntime, B: Backend>(a: Tensor<B, 3>, c: Tensor<B, 3>) -> Tensor<B, 3> {
    if a.dtype() != DType::F32 || c.dtype() != DType::F32 {
        return a.matmul(c);
    }
    match (
        primitive_as::<B, AdTensor<R>, 3>(a),
        primitive_as::<B, AdTensor<R>, 3>(c),
    ) {
        (Ok(a), Ok(c)) => from_primitive_as::<B, _, 3>(matmul_ad_op::<R>(a, c)),
        (a, c) => {
            let back = |r: Result<AdTensor<R>, Tensor<B, 3>>| match r {
                Ok(p) => from_primitive_as::<B, _, 3>(p),
                Err(t) => t,
            };
            back(a).matmul(back(c))
        }
    }
}

struct MatmulBackward<R>(PhantomData<fn() -> R>);

impl<R> std::fmt::Debug for MatmulBackward<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MatmulBackward")
    }
}

impl<R: CubeRuntime> Backward<Fused<R>, 2> for MatmulBackward<R> {
    type State = (GpuTensor<R>, GpuTensor<R>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pa, pc] = ops.parents;
        let grad: Tensor<Fused<R>, 3> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<Fused<R>>(&ops.node)));
        let (a, c) = ops.state;
        let a: Tensor<Fused<R>, 3> = Tensor::from_primitive(TensorPrimitive::Float(a));
        let c: Tensor<Fused<R>, 3> = Tensor::from_primitive(TensorPrimitive::Float(c));
        // A parent broadcast over the batch (a Linear's weight, batch 1) sums its gradient.
        let reduce = |g: Tensor<Fused<R>, 3>, batch: usize| {
            if batch == 1 && g.dims()[0] != 1 {
                g.sum_dim(0)
            } else {
                g
            }
        };
        if let Some(pa) = pa {
            let ba = a.dims()[0];
            let da = reduce(
                matmul_f32::<R, Fused<R>>(grad.clone(), c.clone().swap_dims(1, 2)),
                ba,
            );
            grads.register::<Fused<R>>(pa.id, da.into_primitive().tensor());
        }
        if let Some(pc) = pc {
            let bc = c.dims()[0];
            let dc = reduce(matmul_f32::<R, Fused<R>>(a.swap_dims(1, 2), grad), bc);
            grads.register::<Fused<R>>(pc.id, dc.into_primitive().tensor());
        }
    }
}

fn matmul_ad_op<R: CubeRuntime>(a: AdTensor<R>, c: AdTensor<R>) -> AdTensor<R> {
    let out = matmul_f32_fused::<R>(a.primitive.clone(), c.primitive.clone());
    match MatmulBackward::<R>(PhantomData)
        .prepare::<NoCheckpointing>([a.node.clone(), c.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, c.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
