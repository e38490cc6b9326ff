//! The MARLIN model: encoder, decoder, encoder-to-decoder projection and discriminator, generic
//! over the burn backend so the same code runs on CPU, CUDA and under autodiff.

pub mod block;
pub mod config;
pub mod decoder;
pub mod discriminator;
pub mod encoder;
pub mod host;
pub mod keys;
pub mod load;
pub mod patch_embed;
pub mod weights;

pub use config::MarlinConfig;
pub use patch_embed::{patchify, unpatchify, TubeletShape};
pub use weights::{Part, StateDict, WeightsError};

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use decoder::Decoder;
use discriminator::Discriminator;
use encoder::Encoder;
use keys::{KeyMap, Slot, MARLIN_RENAMES};

/// A MARLIN model. `decoder`/`enc_dec_proj` are present for full checkpoints (reconstruction),
/// `discriminator` for training checkpoints.
#[derive(Module, Debug)]
pub struct Marlin<B: Backend> {
    pub encoder: Encoder<B>,
    pub enc_dec_proj: Option<Linear<B>>,
    pub decoder: Option<Decoder<B>>,
    pub discriminator: Option<Discriminator<B>>,
    pub config: MarlinConfig,
    /// The encoder's inference engine, when one is attached ([`Marlin::with_engine`]): feature
    /// extraction runs on it instead of on burn's ops.
    pub engine: Option<std::sync::Arc<dyn crate::engine::FeatureEngine>>,
}

/// What loading found beside the expected weights.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Keys in the checkpoint that no part of the model uses (warned, not fatal).
    pub unknown_keys: Vec<String>,
}

/// Why a reconstruction cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("mask of {values} values is not [B={batch}, N]")]
    Shape { values: usize, batch: usize },
    #[error("clip {clip} has {count} visible tokens but clip 0 has {first}: every clip of a batch needs the same count")]
    UnequalCounts {
        clip: usize,
        count: usize,
        first: usize,
    },
    #[error("a mask must leave at least one token visible and one masked")]
    AllOrNothing,
    #[error("the mask is not a bool tensor: {0}")]
    NotBool(String),
    #[error("reconstruction needs the decoder: load a full checkpoint (`--full`)")]
    NoDecoder,
}

/// Token indices of a visibility mask: visible and masked, each ascending, per clip.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskIndices {
    pub batch: usize,
    pub visible: Vec<i64>,
    pub masked: Vec<i64>,
}

impl MaskIndices {
    /// From a row-major `[B, N]` visibility mask (true = visible). Every clip must have the same
    /// number of visible tokens, as the batched reference requires.
    pub fn from_bools(mask: &[bool], batch: usize) -> Result<Self, MaskError> {
        if batch == 0 || !mask.len().is_multiple_of(batch) {
            return Err(MaskError::Shape {
                values: mask.len(),
                batch,
            });
        }
        let n = mask.len() / batch;
        let mut visible = Vec::new();
        let mut masked = Vec::new();
        let mut n_vis = None;
        for (b, row) in mask.chunks(n).enumerate() {
            let before = visible.len();
            for (i, &v) in row.iter().enumerate() {
                if v {
                    visible.push(i as i64)
                } else {
                    masked.push(i as i64)
                }
            }
            let k = visible.len() - before;
            match n_vis {
                None => n_vis = Some(k),
                Some(m) if m != k => {
                    return Err(MaskError::UnequalCounts {
                        clip: b,
                        count: k,
                        first: m,
                    })
                }
                _ => {}
            }
        }
        if n_vis == Some(0) || n_vis == Some(n) {
            return Err(MaskError::AllOrNothing);
        }
        Ok(Self {
            batch,
            visible,
            masked,
        })
    }

    pub fn num_visible(&self) -> usize {
        self.visible.len() / self.batch
    }

    pub fn num_masked(&self) -> usize {
        self.masked.len() / self.batch
    }

    /// `([B, n_vis], [B, n_mask])` index tensors on `device`.
    pub fn to_tensors<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let vis = Tensor::from_data(
            TensorData::new(self.visible.clone(), [self.batch, self.num_visible()]),
            device,
        );
        let mask = Tensor::from_data(
            TensorData::new(self.masked.clone(), [self.batch, self.num_masked()]),
            device,
        );
        (vis, mask)
    }
}

impl<B: Backend> Marlin<B> {
    /// Build from a state dict, checking every key of `parts` against `cfg` first (one error
    /// naming the key and both shapes). Keys no part knows are returned as warnings.
    pub fn from_state_dict(
        cfg: &MarlinConfig,
        sd: &StateDict,
        parts: &[Part],
        device: &B::Device,
    ) -> Result<(Self, LoadReport), WeightsError> {
        let mut all = vec![Part::Encoder];
        all.extend(parts.iter().copied().filter(|p| *p != Part::Encoder));
        let parts = &all[..];
        let filled = sd.with_fixed_tables(cfg);
        let sd = filled.as_ref().unwrap_or(sd);
        let unknown_keys = sd.check(cfg, parts)?;
        let model = Self::new(cfg, parts, device);
        let model = Self::key_map(cfg).load(model, sd, cfg.name())?;
        Ok((model, LoadReport { unknown_keys }))
    }

    /// The model of `cfg` with the given parts (the encoder always), unfilled: its parameters
    /// are lazy and take no memory until [`KeyMap::load`] fills them or they are read (zeros).
    pub fn new(cfg: &MarlinConfig, parts: &[Part], device: &B::Device) -> Self {
        let decoder = parts.contains(&Part::Decoder);
        Self {
            encoder: Encoder::new(cfg, device),
            enc_dec_proj: decoder
                .then(|| load::linear(cfg.encoder.embed_dim, cfg.decoder.embed_dim, false, device)),
            decoder: decoder.then(|| Decoder::new(cfg, device)),
            discriminator: parts
                .contains(&Part::Discriminator)
                .then(|| Discriminator::new(cfg.patch_dim(), cfg.discriminator_hidden(), device)),
            config: cfg.clone(),
            engine: None,
        }
    }

    /// Extract features with `engine` (which must hold this model's encoder: build it with
    /// [`crate::engine::for_device`] or from [`crate::engine::EncoderWeights::of_model`]).
    /// [`Marlin::extract_features`], [`Marlin::submit_clips`] and everything built on them
    /// (`extract_video`, batch extraction) then run on the engine; reconstruction and training
    /// still use the model's own weights.
    pub fn with_engine(mut self, engine: std::sync::Arc<dyn crate::engine::FeatureEngine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Official names of this model family: the module tree's paths after [`MARLIN_RENAMES`],
    /// with the tubelet embedding stored as the reference's Conv3d weight.
    pub fn key_map(cfg: &MarlinConfig) -> KeyMap {
        let (t, p) = (cfg.tubelet_size, cfg.patch_size);
        let conv = vec![cfg.encoder.embed_dim, 3, t, p, p];
        KeyMap::new(MARLIN_RENAMES).reshaped("encoder.patch_embedding.weight", conv)
    }

    /// Every parameter of the model with its official key and shape, in the reference's
    /// order (encoder, decoder, its input projection, critic), allocating nothing.
    pub fn slots(&self) -> Vec<(Part, Slot)> {
        let map = Self::key_map(&self.config);
        let mut out: Vec<(Part, Slot)> = map
            .slots_under(&self.encoder, &["encoder"])
            .into_iter()
            .map(|s| (Part::Encoder, s))
            .collect();
        if let (Some(d), Some(p)) = (&self.decoder, &self.enc_dec_proj) {
            for s in map.slots_under(d, &["decoder"]) {
                out.push((Part::Decoder, s));
            }
            for s in map.slots_under(p, &["enc_dec_proj"]) {
                out.push((Part::Decoder, s));
            }
        }
        if let Some(d) = &self.discriminator {
            for s in map.slots_under(d, &["discriminator"]) {
                out.push((Part::Discriminator, s));
            }
        }
        out
    }

    /// Read a checkpoint file and build the parts it holds that `want` asks for (the encoder
    /// always). Asking for the decoder from an encoder-only file is an error naming the file.
    pub fn load_file(
        cfg: &MarlinConfig,
        path: &std::path::Path,
        want: &[Part],
        device: &B::Device,
    ) -> Result<(Self, LoadReport), WeightsError> {
        let sd = StateDict::load(path)?;
        let mut parts = vec![Part::Encoder];
        parts.extend(want.iter().copied().filter(|p| *p != Part::Encoder));
        Self::from_state_dict(cfg, &sd, &parts, device)
    }

    /// Fresh weights with the reference initialisation (deterministic in `seed`).
    pub fn init(cfg: &MarlinConfig, parts: &[Part], seed: u64, device: &B::Device) -> Self {
        let sd = StateDict::init(cfg, parts, seed);
        // The state dict was generated from the same specs the check uses: it always fits.
        Self::from_state_dict(cfg, &sd, parts, device)
            .expect("initialised weights fit their config")
            .0
    }

    /// All weights with official key names, PyTorch layout.
    pub fn to_state_dict(&self) -> StateDict {
        let mut sd = StateDict::new(self.config.name());
        Self::key_map(&self.config).export(self, &mut sd);
        sd
    }

    pub fn parts(&self) -> Vec<Part> {
        let mut p = vec![Part::Encoder];
        if self.decoder.is_some() {
            p.push(Part::Decoder);
        }
        if self.discriminator.is_some() {
            p.push(Part::Discriminator);
        }
        p
    }

    /// Features of clips `[B, 3, T, H, W]` (RGB in [0, 1]): keep_seq -> `[B, N, D]`, else the
    /// pooled feature `[B, 1, D]` (LayerNorm of the token mean).
    ///
    /// With an engine attached the clips go through it (a copy to the host and back); its
    /// failures (out of device memory) panic here as burn's do: [`Marlin::try_extract_clips`]
    /// and batch extraction return them as values.
    pub fn extract_features(&self, clip: Tensor<B, 5>, keep_seq: bool) -> Tensor<B, 3> {
        let Some(engine) = &self.engine else {
            return self.encoder.extract_features(clip, keep_seq);
        };
        let [b, c, t, h, w] = clip.dims();
        let device = clip.device();
        let data = load::to_f32_vec(clip);
        let per = c * t * h * w;
        let clips: Vec<&[f32]> = data.chunks(per.max(1)).take(b).collect();
        match crate::engine::features(engine.as_ref(), &clips, keep_seq) {
            Ok((v, shape)) => Tensor::from_data(TensorData::new(v, shape), &device),
            Err(e) => panic!("{e}"),
        }
    }

    /// Reconstruction: clips `[B, 3, T, H, W]` and a visibility mask `[B, N]` (true = visible,
    /// the same count per clip) -> predicted pixels of the masked tubelets `[B, N_masked, P]`,
    /// values in (c, pt, ph, pw) order, tubelets in ascending index order.
    pub fn forward(
        &self,
        clip: Tensor<B, 5>,
        visible_mask: Tensor<B, 2, Bool>,
    ) -> Result<Tensor<B, 3>, MaskError> {
        let [b, _] = visible_mask.dims();
        let bools = visible_mask
            .into_data()
            .into_vec::<bool>()
            .map_err(|e| MaskError::NotBool(format!("{e:?}")))?;
        let idx = MaskIndices::from_bools(&bools, b)?;
        self.forward_indices(clip, &idx)
    }

    /// [`Marlin::forward`] with precomputed mask indices.
    pub fn forward_indices(
        &self,
        clip: Tensor<B, 5>,
        idx: &MaskIndices,
    ) -> Result<Tensor<B, 3>, MaskError> {
        let (Some(proj), Some(decoder)) = (&self.enc_dec_proj, &self.decoder) else {
            return Err(MaskError::NoDecoder);
        };
        let (vis, mask) = idx.to_tensors::<B>(&clip.device());
        let x = self.encoder.forward(clip, vis.clone());
        let x = block::linear(crate::kernels::of::<B>(), proj, x);
        Ok(decoder.forward(x, vis, mask))
    }

    /// The reconstruction target: pixels of the masked tubelets `[B, N_masked, P]`.
    pub fn target(&self, clip: Tensor<B, 5>, idx: &MaskIndices) -> Tensor<B, 3> {
        let (_, mask) = idx.to_tensors::<B>(&clip.device());
        decoder::gather_tokens(patchify(clip, self.encoder.tubelet), mask)
    }
}
