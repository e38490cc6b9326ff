//! The CUDA backend's kernels: burn's `Cuda` (operation fusion over the CubeCL backend) and
//! its autodiff.
//!
//! In TF32 and bf16 the products are burn's ([`super::autocast`]): its tensor-core matmul and,
//! for attention, its flash-attention kernel (autotuned against the unfused one).
//!
//! In f32 the products are a CUDA-core matmul: burn 0.21's CUDA matmul (`cubek-matmul`'s
//! `adjust_dtypes`) stages f32 operands as TF32 whenever the kernel it picks runs on tensor
//! cores and the GPU has TF32, with no switch to turn that off, so `--precision fp32` would
//! silently be TF32. Here each product is a fusion custom operation that hands the CubeCL
//! tensors to `cubek-matmul`'s `DoubleUnit` routine (register tiles, f32 operands and sums),
//! the way burn's own vision ops reach their kernels from a fused backend. Under autodiff the
//! same product is one op whose backward takes the same f32 products, and attention is one op
//! in blocks of query rows ([`super::attention_ad`]) in every precision.

use super::{autocast, from_primitive_as, primitive_as, Kernels, Precision};
use crate::backend::Gpu;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

/// The backend under the fusion layer.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = <Inner as FusionBackend>::FusionRuntime;
type GpuTensor = FusionTensor<Runtime>;
type AdTensor = burn::tensor::ops::FloatTensor<Autodiff<Gpu>>;

/// `Cuda`: f32 products on CUDA cores, TF32/bf16 through [`autocast`].
pub struct CudaKernels;

/// `Autodiff<Cuda>`: as [`CudaKernels`], with the f32 product as an autodiff op.
pub struct CudaAutodiffKernels;

impl<B: Backend> Kernels<B> for CudaKernels {
    fn name(&self) -> &'static str {
        "cuda"
    }

    /// fp32: in blocks of query rows ([`super::attention_ad::Blocked`]) with both products on
    /// CUDA cores; tf32/bf16: burn's attention (its flash kernel).
    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        match super::gpu_precision() {
            Precision::F32 => {
                let blocked = super::attention_ad::Blocked::<B> {
                    heads,
                    scale,
                    mm: matmul_f32::<B>,
                    budget: super::attention_ad::BLOCK_BYTES,
                };
                blocked.forward(qkv).0
            }
            p => autocast::attention_qkv(qkv, heads, scale, p),
        }
    }

    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        match super::gpu_precision() {
            Precision::F32 => linear_f32(x, w, b, matmul_f32::<B>),
            p => autocast::linear(x, w, b, p),
        }
    }
}

impl<B: Backend> Kernels<B> for CudaAutodiffKernels {
    fn name(&self) -> &'static str {
        "cuda-autodiff"
    }

    /// One autodiff op in blocks of query rows ([`super::attention_ad`]): no `[B, H, N, N]`
    /// matrix is kept for backward.
    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        let mm: super::attention_ad::Matmul<Gpu> = match super::gpu_precision() {
            Precision::F32 => matmul_f32::<Gpu>,
            Precision::Tf32 => |a, b| a.matmul(b),
            Precision::Bf16 => |a, b| {
                a.cast(DType::BF16)
                    .matmul(b.cast(DType::BF16))
                    .cast(DType::F32)
            },
        };
        let budget = super::attention_ad::BLOCK_BYTES;
        // B is Autodiff<Cuda> (the door picks these kernels by type): never handed back.
        super::attention_ad::attention::<B, Gpu>(qkv, heads, scale, mm, budget)
            .unwrap_or_else(|qkv| super::generic_attention(qkv, heads, scale))
    }

    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        match super::gpu_precision() {
            Precision::F32 => linear_f32(x, w, b, matmul_f32_ad::<B>),
            p => autocast::linear(x, w, b, p),
        }
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

/// `a [b, m, k] · c [b, k, n]` in f32 on CUDA cores when `B` is `Cuda` and both are f32;
/// burn's matmul otherwise.
pub fn matmul_f32<B: Backend>(a: Tensor<B, 3>, c: Tensor<B, 3>) -> Tensor<B, 3> {
    if a.dtype() != DType::F32 || c.dtype() != DType::F32 {
        return a.matmul(c);
    }
    match (
        primitive_as::<B, GpuTensor, 3>(a),
        primitive_as::<B, GpuTensor, 3>(c),
    ) {
        (Ok(a), Ok(c)) => from_primitive_as::<B, _, 3>(matmul_f32_fused(a, c)),
        (a, c) => {
            let back = |r: Result<GpuTensor, Tensor<B, 3>>| match r {
                Ok(p) => from_primitive_as::<B, _, 3>(p),
                Err(t) => t,
            };
            back(a).matmul(back(c))
        }
    }
}

/// The custom fusion operation of [`matmul_f32`].
fn matmul_f32_fused(a: GpuTensor, c: GpuTensor) -> GpuTensor {
    #[derive(Clone, Debug)]
    struct MatmulF32 {
        desc: CustomOpIr,
    }

    impl Operation<Runtime> for MatmulF32 {
        fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
            let ([a, c], [out]) = self.desc.as_fixed();
            let a = handles.get_float_tensor::<Inner>(a);
            let c = handles.get_float_tensor::<Inner>(c);
            handles.register_float_tensor::<Inner>(&out.id, unit_matmul(a, c));
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
            MatmulF32 { desc },
        )
        .output()
}

/// `cubek-matmul`'s register-tile (CUDA core) routine: f32 operands, f32 sums. Its naive
/// kernel (also f32) if the routine cannot take the shapes.
fn unit_matmul(a: CubeTensor<CudaRuntime>, c: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
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
    if run(&Strategy::DoubleUnit(Default::default())).is_err() {
        // The naive kernel takes every shape; a failure here is a bug in the kernel library.
        run(&Strategy::Naive).expect("the naive f32 matmul launches");
    }
    out
}

/// [`matmul_f32`] for `Autodiff<Cuda>`: one op whose backward is two f32 products
/// (`dA = dC · Cᵀ`, `dC_in = Aᵀ · dC`).
pub fn matmul_f32_ad<B: Backend>(a: Tensor<B, 3>, c: Tensor<B, 3>) -> Tensor<B, 3> {
    if a.dtype() != DType::F32 || c.dtype() != DType::F32 {
        return a.matmul(c);
    }
    match (
        primitive_as::<B, AdTensor, 3>(a),
        primitive_as::<B, AdTensor, 3>(c),
    ) {
        (Ok(a), Ok(c)) => from_primitive_as::<B, _, 3>(matmul_ad_op(a, c)),
        (a, c) => {
            let back = |r: Result<AdTensor, Tensor<B, 3>>| match r {
                Ok(p) => from_primitive_as::<B, _, 3>(p),
                Err(t) => t,
            };
            back(a).matmul(back(c))
        }
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Gpu, 2> for MatmulBackward {
    type State = (GpuTensor, GpuTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pa, pc] = ops.parents;
        let grad: Tensor<Gpu, 3> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<Gpu>(&ops.node)));
        let (a, c) = ops.state;
        let a: Tensor<Gpu, 3> = Tensor::from_primitive(TensorPrimitive::Float(a));
        let c: Tensor<Gpu, 3> = Tensor::from_primitive(TensorPrimitive::Float(c));
        // A parent broadcast over the batch (a Linear's weight, batch 1) sums its gradient.
        let reduce = |g: Tensor<Gpu, 3>, batch: usize| {
            if batch == 1 && g.dims()[0] != 1 {
                g.sum_dim(0)
            } else {
                g
            }
        };
        if let Some(pa) = pa {
            let ba = a.dims()[0];
            let da = reduce(matmul_f32(grad.clone(), c.clone().swap_dims(1, 2)), ba);
            grads.register::<Gpu>(pa.id, da.into_primitive().tensor());
        }
        if let Some(pc) = pc {
            let bc = c.dims()[0];
            let dc = reduce(matmul_f32(a.swap_dims(1, 2), grad), bc);
            grads.register::<Gpu>(pc.id, dc.into_primitive().tensor());
        }
    }
}

fn matmul_ad_op(a: AdTensor, c: AdTensor) -> AdTensor {
    let out = matmul_f32_fused(a.primitive.clone(), c.primitive.clone());
    match MatmulBackward
        .prepare::<NoCheckpointing>([a.node.clone(), c.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, c.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
