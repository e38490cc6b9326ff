//! The pre-norm transformer block shared by encoder and decoder:
//! x += gamma_1 * Attn(LN1(x)); x += gamma_2 * MLP(LN2(x)).

use super::load::{Exporter, Loader};
use super::weights::WeightsError;
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
        let d = x.dims()[2];
        let h = self.num_heads;
        let bias = match (&self.q_bias, &self.v_bias) {
            (Some(q), Some(v)) => {
                let zeros = Tensor::zeros([d], &x.device());
                Some(Tensor::cat(vec![q.val(), zeros, v.val()], 0))
            }
            _ => None,
        };
        let qkv = burn::tensor::module::linear(x, self.qkv.weight.val(), bias);
        let out = kernels::of::<B>().attention(qkv, h, self.scale as f32);
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
        let h = kernels::of::<B>().gelu(self.fc1.forward(x));
        self.fc2.forward(h)
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
