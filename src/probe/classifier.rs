//! The reference's downstream `Classifier`: a linear head on features, with the MARLIN encoder
//! under it when fine-tuning; its checkpoint names are the encoder's official keys and `fc.*`.

use super::metrics::TaskKind;
use crate::model::encoder::Encoder;
use crate::model::keys::{KeyMap, MARLIN_RENAMES};
use crate::model::load::linear;
use crate::model::weights::{HostTensor, StateDict, WeightsError};
use crate::model::MarlinConfig;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{rngs::StdRng, RngExt, SeedableRng};

/// A linear head, with the encoder under it when fine-tuning.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub encoder: Option<Encoder<B>>,
    pub fc: Linear<B>,
}

impl<B: Backend> Classifier<B> {
    /// A fresh `[d] -> [k]` head, PyTorch's Linear initialisation (uniform in +-1/sqrt(d)),
    /// deterministic in `seed`.
    pub fn new(
        encoder: Option<Encoder<B>>,
        d: usize,
        k: usize,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (d as f32).sqrt();
        let mut u =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(u(d * k), [d, k]), device));
        let bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(u(k), [k]),
            device,
        )));
        Self {
            encoder,
            fc: Linear { weight, bias },
        }
    }

    /// From a checkpoint of [`Classifier::to_state_dict`] (`fc.*`, and `encoder.*` when `cfg`).
    pub fn from_state_dict(
        sd: &StateDict,
        cfg: Option<&MarlinConfig>,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let fc = sd
            .tensors
            .get("fc.weight")
            .ok_or_else(|| WeightsError::Missing {
                file: sd.source.clone(),
                key: "fc.weight".into(),
                expected: vec![],
                hint: " (not a classifier checkpoint)".into(),
            })?;
        let (k, d) = match fc.shape[..] {
            [k, d] => (k, d),
            _ => {
                return Err(WeightsError::Shape {
                    file: sd.source.clone(),
                    key: "fc.weight".into(),
                    config: "a linear head".into(),
                    expected: vec![0, 0],
                    found: fc.shape.clone(),
                })
            }
        };
        let encoder = match cfg {
            Some(c) => {
                sd.check(c, &[crate::model::Part::Encoder])?;
                Some(Encoder::new(c, device))
            }
            None => None,
        };
        let head = Self {
            encoder,
            fc: linear(d, k, true, device),
        };
        head.key_map()
            .load(head, sd, cfg.map_or("a linear head", |c| c.name()))
    }

    /// The encoder's official names (as in [`crate::model::Marlin::key_map`]) and `fc.*`.
    fn key_map(&self) -> KeyMap {
        let map = KeyMap::new(MARLIN_RENAMES);
        match &self.encoder {
            Some(e) => map.reshaped("encoder.patch_embedding.weight", e.patch_conv_shape()),
            None => map,
        }
    }

    /// Official key names for the encoder (so `marlin extract --weights` reads a fine-tuned
    /// checkpoint), `fc.weight` `[k, d]` and `fc.bias` for the head.
    pub fn to_state_dict(&self, name: &str) -> StateDict {
        let mut sd = StateDict::new(name);
        self.key_map().export(self, &mut sd);
        sd
    }

    /// Logits `[b, k]` of features `[b, d]`.
    pub fn forward_features(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // Through the kernels, so the product takes their precision (true f32 on CUDA in fp32).
        crate::model::block::linear_rows(crate::kernels::of::<B>(), &self.fc, x)
    }

    /// Logits `[b, k]` of clips `[b, 3, T, H, W]` (pooled encoder features; needs the encoder).
    pub fn forward_clips(&self, x: Tensor<B, 5>) -> Tensor<B, 2> {
        let b = x.dims()[0];
        match &self.encoder {
            Some(enc) => {
                let f = enc.extract_features(x, false);
                let d = f.dims()[2];
                self.forward_features(f.reshape([b, d]))
            }
            None => panic!("forward_clips needs the encoder (a fine-tuning classifier)"),
        }
    }
}

/// Probabilities `[b, k]` of logits: softmax for multiclass, sigmoid otherwise.
pub fn probs<B: Backend>(logits: Tensor<B, 2>, kind: TaskKind) -> Vec<f32> {
    let p = match kind {
        TaskKind::Multiclass => softmax(logits, 1),
        _ => sigmoid(logits),
    };
    crate::model::load::to_f32_vec(p)
}

/// A checkpoint's head as host tensors, for callers that only need shapes.
pub fn head_shape(sd: &StateDict) -> Option<(usize, usize)> {
    sd.tensors
        .get("fc.weight")
        .map(|t: &HostTensor| (t.shape[1], t.shape[0]))
}
