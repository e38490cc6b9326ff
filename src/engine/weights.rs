//! The encoder's weights on the host, read once from a loaded model through its module tree
//! (each weight by the field that holds it: no key names here), in the form every engine
//! uploads: Linear weights `[in, out]` row-major (burn's layout), the qkv bias as one
//! `[3D]` vector, layer scale folded into the Linear it scales.

use super::schedule::{Linear, Norm, Shape};
use crate::model::encoder::Encoder;
use crate::model::load::to_f32_vec;
use burn::nn;
use burn::tensor::backend::Backend;

/// A Linear: weight `[in, out]` row-major and bias `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWeights {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub inp: usize,
    pub out: usize,
}

/// A LayerNorm's weight and bias `[D]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormWeights {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights {
    pub norm1: NormWeights,
    /// `[D, 3D]`, bias (q_bias, 0, v_bias) where the model has one.
    pub qkv: LinearWeights,
    /// `[D, D]`, layer scale γ₁ folded in.
    pub proj: LinearWeights,
    pub norm2: NormWeights,
    /// `[D, Hid]`.
    pub fc1: LinearWeights,
    /// `[Hid, D]`, layer scale γ₂ folded in.
    pub fc2: LinearWeights,
}

/// Everything the encoder's forward reads.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderWeights {
    pub shape: Shape,
    /// `[P, D]`.
    pub patch: LinearWeights,
    /// The sin-cos table `[N, D]`.
    pub pos: Vec<f32>,
    pub blocks: Vec<BlockWeights>,
    pub norm: NormWeights,
}

fn linear<B: Backend>(l: &nn::Linear<B>) -> LinearWeights {
    let [inp, out] = l.weight.val().dims();
    LinearWeights {
        w: to_f32_vec(l.weight.val()),
        b: l.bias.as_ref().map(|b| to_f32_vec(b.val())),
        inp,
        out,
    }
}

fn norm<B: Backend>(n: &nn::LayerNorm<B>) -> NormWeights {
    let gamma = to_f32_vec(n.gamma.val());
    let beta = match &n.beta {
        Some(b) => to_f32_vec(b.val()),
        None => vec![0.0; gamma.len()],
    };
    NormWeights {
        gamma,
        beta,
        eps: crate::model::load::LN_EPS as f32,
    }
}

/// `l`'s output columns times `gamma` (layer scale: γ ⊙ (x·W + b) = x·(W γ) + b γ).
fn fold_scale(mut l: LinearWeights, gamma: Option<Vec<f32>>) -> LinearWeights {
    if let Some(g) = gamma {
        for row in l.w.chunks_mut(l.out) {
            row.iter_mut().zip(&g).for_each(|(w, g)| *w *= g);
        }
        if let Some(b) = &mut l.b {
            b.iter_mut().zip(&g).for_each(|(b, g)| *b *= g);
        }
    }
    l
}

impl EncoderWeights {
    /// The weights of a loaded encoder (reading its tensors: on a GPU backend, a download).
    pub fn of<B: Backend>(e: &Encoder<B>) -> Self {
        let blocks: Vec<BlockWeights> = e
            .blocks
            .iter()
            .map(|b| {
                let a = &b.attn;
                let mut qkv = linear(&a.qkv);
                if let (Some(q), Some(v)) = (&a.q_bias, &a.v_bias) {
                    let (q, v) = (to_f32_vec(q.val()), to_f32_vec(v.val()));
                    let mut bias = q;
                    bias.extend(std::iter::repeat_n(0.0, v.len()));
                    bias.extend(v);
                    qkv.b = Some(bias);
                }
                let g = |p: &Option<burn::module::Param<burn::tensor::Tensor<B, 1>>>| {
                    p.as_ref().map(|p| to_f32_vec(p.val()))
                };
                BlockWeights {
                    norm1: norm(&b.norm1),
                    qkv,
                    proj: fold_scale(linear(&a.proj), g(&b.gamma_1)),
                    norm2: norm(&b.norm2),
                    fc1: linear(&b.mlp.fc1),
                    fc2: fold_scale(linear(&b.mlp.fc2), g(&b.gamma_2)),
                }
            })
            .collect();
        let patch = linear(&e.patch_embedding);
        let dim = patch.out;
        let first = blocks.first();
        let shape = Shape {
            frames: 0,
            img: 0,
            tubelet: e.tubelet.tubelet,
            patch: e.tubelet.patch,
            dim,
            depth: blocks.len(),
            heads: e.blocks.first().map_or(1, |b| b.attn.num_heads),
            hidden: first.map_or(4 * dim, |b| b.fc1.out),
            scale: e.blocks.first().map_or(1.0, |b| b.attn.scale as f32),
            qkv_bias: first.is_some_and(|b| b.qkv.b.is_some()),
        };
        let pos = to_f32_vec(e.pos_embedding.val());
        EncoderWeights {
            shape,
            patch,
            pos,
            blocks,
            norm: norm(&e.norm),
        }
    }

    /// [`EncoderWeights::of`] with the clip size of `cfg` (frames and pixels per side).
    pub fn of_model<B: Backend>(m: &crate::Marlin<B>) -> Self {
        let mut w = Self::of(&m.encoder);
        w.shape.frames = m.config.clip_frames;
        w.shape.img = m.config.img_size;
        w
    }

    pub fn linear(&self, l: Linear) -> &LinearWeights {
        match l {
            Linear::Patch => &self.patch,
            Linear::Qkv(i) => &self.blocks[i].qkv,
            Linear::Proj(i) => &self.blocks[i].proj,
            Linear::Fc1(i) => &self.blocks[i].fc1,
            Linear::Fc2(i) => &self.blocks[i].fc2,
        }
    }

    pub fn norm(&self, n: Norm) -> &NormWeights {
        match n {
            Norm::Norm1(i) => &self.blocks[i].norm1,
            Norm::Norm2(i) => &self.blocks[i].norm2,
            Norm::Final => &self.norm,
        }
    }

    /// Every Linear, in the schedule's order.
    pub fn linears(&self) -> Vec<Linear> {
        let mut v = vec![Linear::Patch];
        for i in 0..self.blocks.len() {
            v.extend([
                Linear::Qkv(i),
                Linear::Proj(i),
                Linear::Fc1(i),
                Linear::Fc2(i),
            ]);
        }
        v
    }

    /// Every LayerNorm, in the schedule's order.
    pub fn norms(&self) -> Vec<Norm> {
        let mut v = Vec::new();
        for i in 0..self.blocks.len() {
            v.extend([Norm::Norm1(i), Norm::Norm2(i)]);
        }
        v.push(Norm::Final);
        v
    }
}
