//! The MARLIN decoder: projected visible tokens + positions, then mask tokens + positions of the
//! masked tubelets (visible first, masked last, each in ascending index order); blocks; the last
//! N_masked tokens through LayerNorm and the pixel head.

use super::block::Block;
use super::config::MarlinConfig;
use super::load::{layer_norm, lazy, linear};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{backend::Backend, Int, Tensor};

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Learned mask token `[1, 1, D_dec]`.
    pub mask_token: Param<Tensor<B, 3>>,
    /// Fixed sin-cos table `[1, N, D_dec]`.
    pub pos_embedding: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    /// Pixel head D_dec -> 3*tubelet*patch*patch.
    pub head: Linear<B>,
}

/// Gather rows `idx` `[B, K]` of `x` `[B, N, D]` (broadcast over B when x has batch 1).
pub(crate) fn gather_tokens<B: Backend>(x: Tensor<B, 3>, idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, k] = idx.dims();
    let d = x.dims()[2];
    let x = if x.dims()[0] == 1 && b > 1 {
        let n = x.dims()[1];
        x.expand([b, n, d])
    } else {
        x
    };
    x.gather(1, idx.unsqueeze_dim::<3>(2).expand([b, k, d]))
}

impl<B: Backend> Decoder<B> {
    /// Unfilled (lazy) decoder of `cfg`.
    pub fn new(cfg: &MarlinConfig, device: &B::Device) -> Self {
        let d = cfg.decoder.embed_dim;
        let blocks = (0..cfg.decoder.depth)
            .map(|_| {
                Block::new(
                    d,
                    cfg.mlp_hidden(d),
                    cfg.decoder.num_heads,
                    cfg.qkv_bias,
                    cfg.qk_scale,
                    cfg.init_values > 0.0,
                    device,
                )
            })
            .collect();
        Self {
            mask_token: lazy([1, 1, d], device),
            pos_embedding: lazy([1, cfg.num_patches(), d], device).set_require_grad(false),
            blocks,
            norm: layer_norm(d, device),
            head: linear(d, cfg.patch_dim(), true, device),
        }
    }

    /// `x` `[B, n_vis, D_dec]` (projected encoder output), `visible` `[B, n_vis]` and `masked`
    /// `[B, n_mask]` token indices -> predicted pixels of the masked tubelets `[B, n_mask, P]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        visible: Tensor<B, 2, Int>,
        masked: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, n_mask] = masked.dims();
        let d = x.dims()[2];
        let pos = self.pos_embedding.val();
        let pos_vis = gather_tokens(pos.clone(), visible);
        let pos_mask = gather_tokens(pos, masked);
        let mask_tokens = self.mask_token.val().expand([b, n_mask, d]) + pos_mask;
        let mut x = Tensor::cat(vec![x + pos_vis, mask_tokens], 1);
        for block in &self.blocks {
            x = block.forward(x);
        }
        let n = x.dims()[1];
        let x = x.slice([0..b, n - n_mask..n, 0..d]);
        super::block::linear(crate::kernels::of::<B>(), &self.head, self.norm.forward(x))
    }
}
