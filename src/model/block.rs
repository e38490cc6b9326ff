//! The pre-norm transformer block shared by encoder and decoder:
//! x += gamma_1 * Attn(LN1(x)); x += gamma_2 * MLP(LN2(x)).

use super::load::{layer_norm, lazy};
use crate::kernels;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{backend::Backend, Tensor};

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
    /// Unfilled (lazy) attention of width `dim`: weights come from [`super::keys::KeyMap::load`].
    pub fn new(
        dim: usize,
        num_heads: usize,
        qkv_bias: bool,
        qk_scale: Option<f64>,
        device: &B::Device,
    ) -> Self {
        let bias = || qkv_bias.then(|| lazy([dim], device));
        Self {
            qkv: super::load::linear(dim, 3 * dim, false, device),
            q_bias: bias(),
            v_bias: bias(),
            proj: super::load::linear(dim, dim, true, device),
            num_heads,
            scale: attention_scale(qk_scale, dim, num_heads),
        }
    }

    /// [B, N, D] -> [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let d = x.dims()[2];
        let h = self.num_heads;
        let bias = match (&self.q_bias, &self.v_bias) {
            (Some(q), Some(v)) => {
                let zeros = Tensor::zeros([d], &x.device());
                Some(Tensor::cat(vec![q.val(), zeros, v.val()], 0))
            }
            _ => None,
        };
        let k = kernels::of::<B>();
        let qkv = k.linear(x, self.qkv.weight.val(), bias);
        let out = k.attention(qkv, h, self.scale as f32);
        linear(k, &self.proj, out)
    }
}

/// The scale of q·k: the config's qk_scale, or head_dim^-0.5.
pub fn attention_scale(qk_scale: Option<f64>, dim: usize, num_heads: usize) -> f64 {
    qk_scale.unwrap_or(((dim / num_heads) as f64).powf(-0.5))
}

/// A Linear's forward through the backend's kernels (its product in their precision).
pub fn linear<B: Backend>(
    k: &dyn kernels::Kernels<B>,
    l: &Linear<B>,
    x: Tensor<B, 3>,
) -> Tensor<B, 3> {
    k.linear(x, l.weight.val(), l.bias.as_ref().map(|b| b.val()))
}

/// [`linear`] of rows `[B, in] -> [B, out]`.
pub fn linear_rows<B: Backend>(
    k: &dyn kernels::Kernels<B>,
    l: &Linear<B>,
    x: Tensor<B, 2>,
) -> Tensor<B, 2> {
    linear(k, l, x.unsqueeze_dim(0)).squeeze_dim(0)
}

/// Linear(D, hidden) -> exact GELU -> Linear(hidden, D).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let k = kernels::of::<B>();
        let h = k.gelu(linear(k, &self.fc1, x));
        linear(k, &self.fc2, h)
    }
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
    /// Unfilled (lazy) block of width `dim` with an MLP of width `hidden`.
    pub fn new(
        dim: usize,
        hidden: usize,
        num_heads: usize,
        qkv_bias: bool,
        qk_scale: Option<f64>,
        layer_scale: bool,
        device: &B::Device,
    ) -> Self {
        let gamma = || layer_scale.then(|| lazy([dim], device));
        Self {
            norm1: layer_norm(dim, device),
            attn: Attention::new(dim, num_heads, qkv_bias, qk_scale, device),
            norm2: layer_norm(dim, device),
            mlp: Mlp {
                fc1: super::load::linear(dim, hidden, true, device),
                fc2: super::load::linear(hidden, dim, true, device),
            },
            gamma_1: gamma(),
            gamma_2: gamma(),
        }
    }

    /// [B, N, D] -> [B, N, D]
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // The CPU backend runs the whole block as one kernel; elsewhere the block goes op by op.
        let x = match kernels::of::<B>().block(self, x) {
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

impl<B: Backend> kernels::PreNormBlock<B> for Block<B> {
    fn tensors(&self) -> Option<kernels::BlockTensors<B>> {
        if self.gamma_1.is_some() || self.gamma_2.is_some() || self.attn.qkv.bias.is_some() {
            return None;
        }
        let norm = |n: &LayerNorm<B>| Some((n.gamma.val(), n.beta.as_ref()?.val()));
        let lin = |l: &Linear<B>| (l.weight.val(), l.bias.as_ref().map(|b| b.val()));
        let qv_bias = match (&self.attn.q_bias, &self.attn.v_bias) {
            (Some(q), Some(v)) => Some((q.val(), v.val())),
            _ => None,
        };
        Some(kernels::BlockTensors {
            norm1: norm(&self.norm1)?,
            qkv: self.attn.qkv.weight.val(),
            qv_bias,
            proj: lin(&self.attn.proj),
            norm2: norm(&self.norm2)?,
            fc1: lin(&self.mlp.fc1),
            fc2: lin(&self.mlp.fc2),
            heads: self.attn.num_heads,
            scale: self.attn.scale as f32,
            eps: super::load::LN_EPS as f32,
        })
    }
}
