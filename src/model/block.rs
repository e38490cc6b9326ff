//! The pre-norm transformer block shared by encoder and decoder:
//! x += gamma_1 * Attn(LN1(x)); x += gamma_2 * MLP(LN2(x)).

use super::load::{Exporter, Loader};
use super::weights::WeightsError;
use burn::backend::flex::FlexTensor;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Tensor};
use std::any::Any;

/// Multi-head self-attention with one bias-free `qkv` projection; when qkv_bias is on, the bias
/// is concat(q_bias, 0, v_bias): k never has a bias.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub qkv: Linear<B>,
    pub q_bias: Option<Param<Tensor<B, 1>>>,
    pub v_bias: Option<Param<Tensor<B, 1>>>,
    pub proj: Linear<B>,
    pub num_heads: usize,
    /// Scale of q·k: qk_scale or head_dim^-0.5.
    pub scale: f64,
}

impl<B: Backend> Attention<B> {
    pub fn load(
        l: &Loader<B>,
        prefix: &str,
        num_heads: usize,
        qkv_bias: bool,
        qk_scale: Option<f64>,
    ) -> Result<Self, WeightsError> {
        let qkv = l.linear(&format!("{prefix}.qkv"), false)?;
        let dim = qkv.weight.dims()[0];
        let (q_bias, v_bias) = l.optional_pair(prefix, ("q_bias", "v_bias"), qkv_bias)?;
        Ok(Self {
            qkv,
            q_bias,
            v_bias,
            proj: l.linear(&format!("{prefix}.proj"), true)?,
            num_heads,
            scale: qk_scale.unwrap_or(((dim / num_heads) as f64).powf(-0.5)),
        })
    }

    pub fn export(&self, e: &mut Exporter, prefix: &str) {
        e.linear(&format!("{prefix}.qkv"), &self.qkv);
        if let (Some(q), Some(v)) = (&self.q_bias, &self.v_bias) {
            e.tensor(&format!("{prefix}.q_bias"), &q.val());
            e.tensor(&format!("{prefix}.v_bias"), &v.val());
        }
        e.linear(&format!("{prefix}.proj"), &self.proj);
    }

    /// [B, N, D] -> [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let hd = d / h;
        let bias = match (&self.q_bias, &self.v_bias) {
            (Some(q), Some(v)) => {
                let zeros = Tensor::zeros([d], &x.device());
                Some(Tensor::cat(vec![q.val(), zeros, v.val()], 0))
            }
            _ => None,
        };
        let qkv = burn::tensor::module::linear(x, self.qkv.weight.val(), bias);
        // Under autodiff on the CPU: one op with its own backward kernel.
        let qkv = match super::cpu_autodiff::attention(qkv, h, self.scale as f32) {
            Ok(out) => return self.proj.forward(out),
            Err(qkv) => qkv,
        };
        if is_plain_cpu::<B>() {
            let device = qkv.device();
            if let Ok(data) = qkv.clone().into_data().into_vec::<f32>() {
                let out = super::cpu_kernels::attention(&data, b, n, h, hd, self.scale as f32);
                let out = Tensor::from_data(burn::tensor::TensorData::new(out, [b, n, d]), &device);
                return self.proj.forward(out);
            }
        }
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = qkv.reshape([b, n, 3, h, hd]).permute([2, 0, 3, 1, 4]);
        let mut parts = qkv.chunk(3, 0).into_iter().map(|t| t.squeeze_dim::<4>(0));
        // chunk(3) of a size-3 dim yields exactly three parts.
        let (q, k, v) = (
            parts.next().expect("q"),
            parts.next().expect("k"),
            parts.next().expect("v"),
        );
        let opts = AttentionModuleOptions {
            scale: Some(self.scale),
            softcap: None,
            is_causal: false,
        };
        let out = attention(q, k, v, None, None, opts); // [B, H, N, hd]
        let out = out.swap_dims(1, 2).reshape([b, n, d]);
        self.proj.forward(out)
    }
}

/// Linear(D, hidden) -> exact GELU -> Linear(hidden, D).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = match super::cpu_autodiff::gelu(h) {
            Ok(g) => return self.fc2.forward(g),
            Err(h) => h,
        };
        if is_plain_cpu::<B>() {
            // The CPU backend's GELU is scalar and single-threaded: ours is neither.
            let dims = h.dims();
            let device = h.device();
            if let Ok(mut v) = h.clone().into_data().into_vec::<f32>() {
                super::cpu_kernels::gelu_in_place(&mut v);
                let h = Tensor::from_data(burn::tensor::TensorData::new(v, dims), &device);
                return self.fc2.forward(h);
            }
        }
        self.fc2.forward(gelu(h))
    }
}

impl<B: Backend> Block<B> {
    /// The whole block as one host kernel (`cpu_kernels::block_forward`) on the plain CPU
    /// backend, reading the weights in place; gives `x` back untouched where it does not
    /// apply (other backends, layer scale).
    fn forward_host(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
        if !is_plain_cpu::<B>() || self.gamma_1.is_some() || self.gamma_2.is_some() {
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
            let qv = match (&self.attn.q_bias, &self.attn.v_bias) {
                (Some(q), Some(v)) => Some((flex(q.val())?, flex(v.val())?)),
                _ => None,
            };
            Some((
                norm(&self.norm1)?,
                linear(&self.attn.qkv)?,
                qv,
                linear(&self.attn.proj)?,
                norm(&self.norm2)?,
                linear(&self.mlp.fc1)?,
                linear(&self.mlp.fc2)?,
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
            Some(super::cpu_kernels::BlockWeights {
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
                heads: self.attn.num_heads,
                scale: self.attn.scale as f32,
                eps: super::load::LN_EPS as f32,
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
        super::cpu_kernels::block_forward(&mut data, b, n, d, &w);
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

/// The plain CPU backend (`Flex`, not under autodiff): where our CPU kernels replace burn ops
/// that run on one thread. Other backends (CUDA, autodiff) take the generic path.
fn is_plain_cpu<B: Backend>() -> bool {
    B::name(&Default::default()) == "flex"
}

/// Pre-norm transformer block with optional layer scale (gamma_1, gamma_2).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub gamma_1: Option<Param<Tensor<B, 1>>>,
    pub gamma_2: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Block<B> {
    pub fn load(
        l: &Loader<B>,
        prefix: &str,
        num_heads: usize,
        qkv_bias: bool,
        qk_scale: Option<f64>,
        layer_scale: bool,
    ) -> Result<Self, WeightsError> {
        let (gamma_1, gamma_2) = l.optional_pair(prefix, ("gamma_1", "gamma_2"), layer_scale)?;
        Ok(Self {
            norm1: l.layer_norm(&format!("{prefix}.norm1"))?,
            attn: Attention::load(l, &format!("{prefix}.attn"), num_heads, qkv_bias, qk_scale)?,
            norm2: l.layer_norm(&format!("{prefix}.norm2"))?,
            mlp: Mlp {
                fc1: l.linear(&format!("{prefix}.mlp.layers.0.linear"), true)?,
                fc2: l.linear(&format!("{prefix}.mlp.layers.1.linear"), true)?,
            },
            gamma_1,
            gamma_2,
        })
    }

    pub fn export(&self, e: &mut Exporter, prefix: &str) {
        e.layer_norm(&format!("{prefix}.norm1"), &self.norm1);
        self.attn.export(e, &format!("{prefix}.attn"));
        e.layer_norm(&format!("{prefix}.norm2"), &self.norm2);
        e.linear(&format!("{prefix}.mlp.layers.0.linear"), &self.mlp.fc1);
        e.linear(&format!("{prefix}.mlp.layers.1.linear"), &self.mlp.fc2);
        if let (Some(g1), Some(g2)) = (&self.gamma_1, &self.gamma_2) {
            e.tensor(&format!("{prefix}.gamma_1"), &g1.val());
            e.tensor(&format!("{prefix}.gamma_2"), &g2.val());
        }
    }

    /// [B, N, D] -> [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = match self.forward_host(x) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let a = self.attn.forward(self.norm1.forward(x.clone()));
        let a = match &self.gamma_1 {
            Some(g) => a * g.val().unsqueeze::<3>(),
            None => a,
        };
        let x = x + a;
        let m = self.mlp.forward(self.norm2.forward(x.clone()));
        let m = match &self.gamma_2 {
            Some(g) => m * g.val().unsqueeze::<3>(),
            None => m,
        };
        x + m
    }
}
