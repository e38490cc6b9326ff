//! The MARLIN ViT encoder: tubelet embedding + fixed sin-cos positions, transformer blocks,
//! final LayerNorm.

use super::block::Block;
use super::config::MarlinConfig;
use super::load::{Exporter, Loader};
use super::patch_embed::{patchify, TubeletShape};
use super::weights::WeightsError;
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
    pub fn load(l: &Loader<B>, cfg: &MarlinConfig) -> Result<Self, WeightsError> {
        let blocks = (0..cfg.encoder.depth)
            .map(|i| {
                Block::load(
                    l,
                    &format!("encoder.blocks.{i}"),
                    cfg.encoder.num_heads,
                    cfg.qkv_bias,
                    cfg.qk_scale,
                    cfg.init_values > 0.0,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patch_embedding: l.linear("encoder.patch_embedding.projection", true)?,
            pos_embedding: l
                .param("encoder.pos_embedding.emb")?
                .set_require_grad(false),
            blocks,
            norm: l.layer_norm("encoder.norm")?,
            tubelet: TubeletShape {
                tubelet: cfg.tubelet_size,
                patch: cfg.patch_size,
            },
        })
    }

    pub fn export(&self, e: &mut Exporter) {
        let [pd, d] = self.patch_embedding.weight.dims();
        let (t, p) = (self.tubelet.tubelet, self.tubelet.patch);
        debug_assert_eq!(pd, 3 * t * p * p);
        e.linear_as_conv(
            "encoder.patch_embedding.projection",
            &self.patch_embedding,
            vec![d, 3, t, p, p],
        );
        e.tensor("encoder.pos_embedding.emb", &self.pos_embedding.val());
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(e, &format!("encoder.blocks.{i}"));
        }
        e.layer_norm("encoder.norm", &self.norm);
    }

    /// Clip `[B, 3, T, H, W]` -> embedded tokens with positions `[B, N, D]`.
    pub fn embed(&self, clip: Tensor<B, 5>) -> Tensor<B, 3> {
        let tokens = self.patch_embedding.forward(patchify(clip, self.tubelet));
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
