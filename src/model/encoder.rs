//! The MARLIN ViT encoder: tubelet embedding + fixed sin-cos positions, transformer blocks,
//! final LayerNorm.

use super::block::Block;
use super::config::MarlinConfig;
use super::load::{layer_norm, lazy, linear};
use super::patch_embed::{patchify, TubeletShape};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{backend::Backend, Int, Tensor};

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// Tubelet projection, the Conv3d weight flattened: `[3*tubelet*patch*patch, D]`.
    pub patch_embedding: Linear<B>,
    /// Fixed sin-cos table `[1, N, D]` (not trained).
    pub pos_embedding: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    pub tubelet: TubeletShape,
}

impl<B: Backend> Encoder<B> {
    /// Unfilled (lazy) encoder of `cfg`: weights come from [`super::keys::KeyMap::load`].
    pub fn new(cfg: &MarlinConfig, device: &B::Device) -> Self {
        let d = cfg.encoder.embed_dim;
        let blocks = (0..cfg.encoder.depth)
            .map(|_| {
                Block::new(
                    d,
                    cfg.mlp_hidden(d),
                    cfg.encoder.num_heads,
                    cfg.qkv_bias,
                    cfg.qk_scale,
                    cfg.init_values > 0.0,
                    device,
                )
            })
            .collect();
        Self {
            patch_embedding: linear(cfg.patch_dim(), d, true, device),
            pos_embedding: lazy([1, cfg.num_patches(), d], device).set_require_grad(false),
            blocks,
            norm: layer_norm(d, device),
            tubelet: TubeletShape {
                tubelet: cfg.tubelet_size,
                patch: cfg.patch_size,
            },
        }
    }

    /// The tubelet embedding's shape as the reference's Conv3d weight `[D, 3, t, p, p]`.
    pub fn patch_conv_shape(&self) -> Vec<usize> {
        let d = self.patch_embedding.weight.lazy_shape().to_vec()[1];
        let (t, p) = (self.tubelet.tubelet, self.tubelet.patch);
        vec![d, 3, t, p, p]
    }

    /// Clip `[B, 3, T, H, W]` -> embedded tokens with positions `[B, N, D]`.
    pub fn embed(&self, clip: Tensor<B, 5>) -> Tensor<B, 3> {
        let k = crate::kernels::of::<B>();
        let tokens = super::block::linear(k, &self.patch_embedding, patchify(clip, self.tubelet));
        tokens + self.pos_embedding.val()
    }

    /// Training forward: only the visible tokens go through the blocks.
    /// `visible` `[B, n_vis]` holds token indices in ascending order. Returns `[B, n_vis, D]`.
    pub fn forward(&self, clip: Tensor<B, 5>, visible: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.embed(clip);
        let d = x.dims()[2];
        let [b, nv] = visible.dims();
        let idx = visible.unsqueeze_dim::<3>(2).expand([b, nv, d]);
        let mut x = x.gather(1, idx);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.norm.forward(x)
    }

    /// All tokens through the blocks, before the final LayerNorm: `[B, N, D]`.
    pub fn forward_all(&self, clip: Tensor<B, 5>) -> Tensor<B, 3> {
        let mut x = self.embed(clip);
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }

    /// Features without masking. keep_seq: LN(x) `[B, N, D]`; else LN(mean over tokens of x)
    /// `[B, 1, D]` (the mean is taken before the LayerNorm, as the reference does).
    pub fn extract_features(&self, clip: Tensor<B, 5>, keep_seq: bool) -> Tensor<B, 3> {
        let x = self.forward_all(clip);
        if keep_seq {
            self.norm.forward(x)
        } else {
            self.norm.forward(x.mean_dim(1))
        }
    }
}
