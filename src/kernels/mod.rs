//! Backend-specific code behind one door. The model's files call [`of`]`::<B>()` and the
//! [`Kernels`] it returns; nothing else in the model looks at which backend runs.
//!
//! [`Kernels`]' default methods are burn's generic ops (what runs on CUDA, where fusion and
//! autotune apply). The CPU backend (`Flex`) overrides attention, GELU and the whole
//! transformer block with host kernels ([`cpu`]); under autodiff on the CPU
//! (`Autodiff<Flex>`) attention and GELU are single autodiff ops with their own backward
//! kernels ([`cpu_autodiff`]). Rust has no specialisation, so [`of`] picks the implementation
//! by the backend's type once per call; each override reaches its backend's primitive through
//! a downcast that cannot fail for the backend it was picked for.

pub mod bf16;

/// The precision of the CPU block kernel's matrix products (the four Linears of every block):
/// f32, or bf16 operands with f32 sums. LayerNorm, softmax, GELU and residuals stay in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision '{s}' (expected f32 or bf16)")),
        }
    }
}

static CPU_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Choose the CPU kernels' precision for this process. bf16 needs AVX-512 BF16: without it
/// the products stay in f32 and the returned note says so (one line for the user).
pub fn set_cpu_precision(p: Precision) -> (Precision, Option<String>) {
    let (effective, note) = match p {
        Precision::Bf16 if !bf16::supported() => (
            Precision::F32,
            Some("this CPU has no AVX-512 BF16 instructions: computing in f32 instead".to_string()),
        ),
        p => (p, None),
    };
    CPU_BF16.store(
        effective == Precision::Bf16,
        std::sync::atomic::Ordering::Relaxed,
    );
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
pub mod cpu;
pub mod cpu_autodiff;

use crate::model::block::Block;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
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

    /// Exact (erf) GELU.
    fn gelu(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        burn::tensor::activation::gelu(x)
    }

    /// A whole pre-norm block `[B, N, D] -> [B, N, D]` in one kernel, or `x` back untouched to
    /// run the block op by op.
    fn block(&self, _block: &Block<B>, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        Err(x)
    }
}

/// Burn's generic ops: every backend without an override (CUDA, autodiff on CUDA).
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
        &Generic
    }
}

/// burn's attention op on the fused projection.
pub fn generic_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
    let [b, n, d3] = qkv.dims();
    let d = d3 / 3;
    let hd = d / heads;
    // [B, N, 3, H, hd] -> [3, B, H, N, hd]
    let qkv = qkv.reshape([b, n, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
    let mut parts = qkv.chunk(3, 0).into_iter().map(|t| t.squeeze_dim::<4>(0));
    // chunk(3) of a size-3 dim yields exactly three parts.
    let (q, k, v) = (
        parts.next().expect("q"),
        parts.next().expect("k"),
        parts.next().expect("v"),
    );
    let opts = AttentionModuleOptions {
        scale: Some(scale as f64),
        softcap: None,
        is_causal: false,
    };
    let out = attention(q, k, v, None, None, opts); // [B, H, N, hd]
    out.swap_dims(1, 2).reshape([b, n, d])
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
                let out = cpu::attention(&data, b, n, heads, d / heads, scale);
                Tensor::from_data(TensorData::new(out, [b, n, d]), &device)
            }
            // Not f32: burn's op.
            Err(_) => generic_attention(qkv, heads, scale),
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
    fn block(&self, blk: &Block<B>, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        if blk.gamma_1.is_some() || blk.gamma_2.is_some() {
            return Err(x);
        }
        let linear = |l: &Linear<B>| -> Option<(FlexTensor, Option<FlexTensor>)> {
            Some((
                flex(l.weight.val())?,
                match &l.bias {
                    Some(b) => Some(flex(b.val())?),
                    None => None,
                },
            ))
        };
        let norm = |n: &LayerNorm<B>| -> Option<(FlexTensor, FlexTensor)> {
            Some((flex(n.gamma.val())?, flex(n.beta.as_ref()?.val())?))
        };
        let held = (|| {
            let qv = match (&blk.attn.q_bias, &blk.attn.v_bias) {
                (Some(q), Some(v)) => Some((flex(q.val())?, flex(v.val())?)),
                _ => None,
            };
            Some((
                norm(&blk.norm1)?,
                linear(&blk.attn.qkv)?,
                qv,
                linear(&blk.attn.proj)?,
                norm(&blk.norm2)?,
                linear(&blk.mlp.fc1)?,
                linear(&blk.mlp.fc2)?,
            ))
        })();
        let Some((n1, qkv, qv, proj, n2, fc1, fc2)) = held else {
            return Err(x);
        };
        fn sl(t: &FlexTensor) -> Option<&[f32]> {
            t.as_slice::<f32>()
        }
        fn pair((a, b): &(FlexTensor, FlexTensor)) -> Option<(&[f32], &[f32])> {
            Some((sl(a)?, sl(b)?))
        }
        fn lin((w, b): &(FlexTensor, Option<FlexTensor>)) -> Option<(&[f32], &[f32])> {
            Some((sl(w)?, sl(b.as_ref()?)?))
        }
        let w = (|| {
            Some(cpu::BlockWeights {
                norm1: pair(&n1)?,
                qkv: sl(&qkv.0)?,
                qv_bias: match &qv {
                    Some(p) => Some(pair(p)?),
                    None => None,
                },
                proj: lin(&proj)?,
                norm2: pair(&n2)?,
                fc1: lin(&fc1)?,
                fc2: lin(&fc2)?,
                heads: blk.attn.num_heads,
                scale: blk.attn.scale as f32,
                eps: crate::model::load::LN_EPS as f32,
            })
        })();
        // The qkv Linear of a block has no bias of its own (q/v biases are separate).
        let Some(w) = w.filter(|_| qkv.1.is_none()) else {
            return Err(x);
        };
        if x.dtype() != burn::tensor::DType::F32 {
            return Err(x);
        }
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

/// The Flex tensor behind `t` (a refcount, no copy) when `B` is the plain CPU backend.
fn flex<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<FlexTensor> {
    let prim: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    prim.downcast::<FlexTensor>().ok().map(|b| *b)
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
        let (a, b) = (
            crate::model::load::to_f32_vec(a),
            crate::model::load::to_f32_vec(b),
        );
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).fold(0f32, |m, (x, y)| {
            assert!(x.is_finite() && y.is_finite());
            m.max((x - y).abs())
        })
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
        }
        check::<Flex>();
        check::<Autodiff<Flex>>();
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
