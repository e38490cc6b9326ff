//! Self-supervised pretraining: masked reconstruction (MSE on the masked tubelets) plus a WGAN
//! critic on the reconstructed patches, as the reference's training step:
//!
//! 1. `d_steps` times: critic loss mean(D(fake)) - mean(D(real)) on the masked patches
//!    (reconstruction detached), plus `gp_weight` times the gradient penalty
//!    mean over patches of (|dD/dx at x = a*real + (1-a)*fake| - 1)^2 with one uniform draw a
//!    per critic step (the reference's definition), one AdamW step of the discriminator;
//! 2. `g_steps` times: MSE(pred, real) + adv_weight * -mean(D(pred)) with the updated critic,
//!    one AdamW step of encoder + projection + decoder.
//!
//! Two AdamW optimisers (the config's betas, eps, weight decay). Learning rates per epoch come
//! from [`schedule::lr_at`].

/// Why pretraining (data, a step, a run, its checkpoints) failed. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Mask(#[from] crate::model::MaskError),
    #[error(transparent)]
    Weights(#[from] crate::model::WeightsError),
    #[error(transparent)]
    Video(#[from] crate::video::VideoError),
    /// Data layout, configs, checkpoints and run state: the message names the file.
    #[error("{0}")]
    Run(String),
    /// The device failed (out of GPU memory at this batch size, no kernel compiler).
    #[error(transparent)]
    Device(#[from] crate::device_error::DeviceError),
    /// Another rank of a multi-process run is gone, or the ranks disagree.
    #[error(transparent)]
    Dist(#[from] crate::distributed::DistError),
    /// Too many steps in a row had a loss that is not a number: the run stops, the last
    /// checkpoint is intact.
    #[error(
        "{steps} steps in a row (epoch {epoch}, step {step}) had non-finite losses and were \
         skipped: the run stopped; the last checkpoint is intact. Lower the learning rate or \
         use --precision fp32, then --resume"
    )]
    NonFinite {
        steps: usize,
        epoch: usize,
        step: usize,
    },
}

impl From<String> for TrainError {
    fn from(msg: String) -> Self {
        TrainError::Run(msg)
    }
}

impl From<&str> for TrainError {
    fn from(msg: &str) -> Self {
        TrainError::Run(msg.into())
    }
}

pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod prepare;
pub mod reconstruct;
pub mod run;
pub mod samples;
pub mod schedule;

use crate::distributed::{all_reduce_gradients, Group};
use crate::model::discriminator::Discriminator;
use crate::model::load::to_scalar;
use crate::model::{Marlin, MarlinConfig, MaskIndices};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use std::sync::Arc;

/// The losses of one step (or of a validation batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepLosses {
    /// Critic loss mean(D(fake)) - mean(D(real)) (+ gp_weight * gp in training, as the
    /// reference logs it).
    pub d_loss: f64,
    /// Reconstruction MSE.
    pub rec: f64,
    /// adv_weight * -mean(D(pred)).
    pub adv: f64,
    /// rec + adv.
    pub g_loss: f64,
    /// The gradient penalty (before gp_weight) of the last critic step; 0 when off.
    pub gp: f64,
    /// A loss was not finite (NaN or infinite): its optimiser update was skipped, the weights
    /// are those before it.
    #[serde(skip)]
    pub skipped: bool,
}

/// Losses settings from the model config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub adv_loss: bool,
    pub adv_weight: f64,
    /// Weight of the critic's gradient penalty (0: none, as the released configs).
    pub gp_weight: f64,
    pub d_steps: usize,
    pub g_steps: usize,
}

impl LossConfig {
    /// The config's loss settings (its weights are checked, >= 0 and finite, by
    /// `MarlinConfig::validate`).
    pub fn from_config(cfg: &MarlinConfig) -> Self {
        Self {
            adv_loss: cfg.adv_loss,
            adv_weight: cfg.adv_weight,
            gp_weight: cfg.gp_weight,
            d_steps: cfg.d_steps.max(1),
            g_steps: cfg.g_steps.max(1),
        }
    }
}

/// The config's AdamW betas and eps (defaults (0.9, 0.95) and 1e-8).
pub fn adam_betas_eps(cfg: &MarlinConfig) -> ([f64; 2], f64) {
    cfg.optimizer
        .as_ref()
        .map(|o| (o.betas, o.eps))
        .unwrap_or(([0.9, 0.95], 1e-8))
}

/// AdamW as the config describes it (betas, eps, weight decay; defaults (0.9, 0.95), 1e-8, 0).
pub fn adamw(cfg: &MarlinConfig) -> AdamWConfig {
    let (betas, eps) = adam_betas_eps(cfg);
    AdamWConfig::new()
        .with_beta_1(betas[0] as f32)
        .with_beta_2(betas[1] as f32)
        .with_epsilon(eps as f32)
        .with_weight_decay(cfg.weight_decay as f32)
}

/// The generator's optimiser state.
pub type GenRecord<B> = <OptimizerAdaptor<AdamW, Marlin<B>, B> as Optimizer<Marlin<B>, B>>::Record;
/// The critic's optimiser state.
pub type CriticRecord<B> =
    <OptimizerAdaptor<AdamW, Discriminator<B>, B> as Optimizer<Discriminator<B>, B>>::Record;

/// The generator (encoder, projection, decoder), the critic and their optimisers.
pub struct Pretrainer<B: AutodiffBackend> {
    generator: Option<Marlin<B>>,
    critic: Option<Discriminator<B>>,
    opt_g: OptimizerAdaptor<AdamW, Marlin<B>, B>,
    opt_d: OptimizerAdaptor<AdamW, Discriminator<B>, B>,
    pub losses: LossConfig,
    /// The ranks of a data-parallel run: each update's gradients (and the step's losses) are
    /// averaged across them before the optimiser steps.
    group: Option<Arc<Group>>,
}

impl<B: AutodiffBackend> Pretrainer<B> {
    /// From a full model with its discriminator (`Marlin::init` / `load_file` with all parts).
    pub fn new(mut model: Marlin<B>, losses: LossConfig) -> Result<Self, TrainError> {
        let critic = model
            .discriminator
            .take()
            .ok_or("pretraining needs the discriminator")?;
        if model.decoder.is_none() {
            return Err("pretraining needs the decoder".into());
        }
        let opt = adamw(&model.config);
        Ok(Self {
            opt_g: opt.init(),
            opt_d: opt.init(),
            generator: Some(model),
            critic: Some(critic),
            losses,
            group: None,
        })
    }

    /// Average every update's gradients across `group` (data-parallel training).
    pub fn with_group(mut self, group: Option<Arc<Group>>) -> Self {
        self.group = group;
        self
    }

    /// The model with its discriminator, for checkpoints.
    pub fn model(&self) -> Marlin<B> {
        let mut m = self.generator().clone();
        m.discriminator = self.critic.clone();
        m
    }

    pub fn critic_module(&self) -> &Discriminator<B> {
        self.critic()
    }

    pub fn generator(&self) -> &Marlin<B> {
        // Both are Some between steps; `step` takes them only for the optimiser call.
        self.generator
            .as_ref()
            .expect("generator present between steps")
    }

    fn critic(&self) -> &Discriminator<B> {
        self.critic.as_ref().expect("critic present between steps")
    }

    /// The optimisers' state, for checkpoints.
    pub fn optimizer_records(&self) -> (GenRecord<B>, CriticRecord<B>) {
        (self.opt_g.to_record(), self.opt_d.to_record())
    }

    /// Restore the optimisers' state.
    pub fn load_optimizer_records(&mut self, g: GenRecord<B>, d: CriticRecord<B>) {
        self.opt_g = self.opt_g.clone().load_record(g);
        self.opt_d = self.opt_d.clone().load_record(d);
    }

    /// One training step on clips `[B, 3, T, H, W]` with visibility `idx`, learning rate `lr`;
    /// `gp_seed` draws the gradient penalty's interpolation weight of each critic step (the run
    /// derives it from `--seed`, epoch and batch, so runs repeat).
    pub fn step(
        &mut self,
        clip: Tensor<B, 5>,
        idx: &MaskIndices,
        lr: f64,
        gp_seed: u64,
    ) -> Result<StepLosses, TrainError> {
        let real = self.generator().target(clip.clone(), idx);
        let mut out = StepLosses::default();
        if self.losses.adv_loss {
            for j in 0..self.losses.d_steps {
                // The critic learns from a reconstruction that needs no gradient: run the
                // generator on the inner backend (no autodiff graph; the CPU backend's fast
                // inference kernels apply) and lift the result.
                let inner = self.generator().valid();
                let pred = Tensor::from_inner(
                    inner
                        .forward_indices(clip.clone().inner(), idx)
                        .map_err(|e| e.to_string())?,
                );
                let critic = self.critic();
                let mut loss =
                    critic.forward(pred.clone()).mean() - critic.forward(real.clone()).mean();
                let mut gp_value = None;
                if self.losses.gp_weight > 0.0 {
                    let a = gp_alpha(gp_seed, j);
                    let interp = real.clone().mul_scalar(a) + pred.mul_scalar(1.0 - a);
                    let g = critic.input_gradient(interp);
                    let norm = (g.clone() * g).sum_dim(2).sqrt();
                    let gp = norm.sub_scalar(1.0).powi_scalar(2).mean();
                    gp_value = Some(gp.clone().inner());
                    loss = loss + gp.mul_scalar(self.losses.gp_weight);
                }
                // One read back from the device per update (it needs the loss: a non-finite
                // one makes no update).
                let v = scalars(
                    std::iter::once(loss.clone().inner())
                        .chain(gp_value)
                        .collect(),
                );
                out.d_loss = v[0];
                out.gp = v.get(1).copied().unwrap_or(out.gp);
                let grads = match &self.group {
                    // Every rank takes the same decision on the mean losses (NaN on one rank
                    // is NaN in the mean).
                    Some(group) => {
                        let grads = GradientsParams::from_grads(loss.backward(), critic);
                        let mut extra = [out.d_loss as f32, out.gp as f32];
                        let grads = all_reduce_gradients(
                            group,
                            critic,
                            grads,
                            &mut extra,
                            "the critic's gradient all-reduce",
                        )?;
                        (out.d_loss, out.gp) = (extra[0] as f64, extra[1] as f64);
                        Some(grads)
                    }
                    None => None,
                };
                if !out.d_loss.is_finite() {
                    // No update from a loss that is not a number (the weights would be lost).
                    out.skipped = true;
                    continue;
                }
                let grads =
                    grads.unwrap_or_else(|| GradientsParams::from_grads(loss.backward(), critic));
                let c = self.critic.take().ok_or("critic missing")?;
                self.critic = Some(self.opt_d.step(lr, c, grads));
            }
        }
        for _ in 0..self.losses.g_steps {
            let pred = self
                .generator()
                .forward_indices(clip.clone(), idx)
                .map_err(|e| e.to_string())?;
            let diff = pred.clone() - real.clone();
            let rec = (diff.clone() * diff).mean();
            let (loss, adv) = if self.losses.adv_loss {
                let adv = self
                    .critic()
                    .forward(pred)
                    .mean()
                    .neg()
                    .mul_scalar(self.losses.adv_weight);
                (rec.clone() + adv.clone(), Some(adv.inner()))
            } else {
                (rec.clone(), None)
            };
            let v = scalars(
                [loss.clone().inner(), rec.inner()]
                    .into_iter()
                    .chain(adv)
                    .collect(),
            );
            out.g_loss = v[0];
            out.rec = v[1];
            out.adv = v.get(2).copied().unwrap_or(out.adv);
            let grads = match &self.group {
                Some(group) => {
                    let grads = GradientsParams::from_grads(loss.backward(), self.generator());
                    let mut extra = [out.g_loss as f32, out.rec as f32, out.adv as f32];
                    let grads = all_reduce_gradients(
                        group,
                        self.generator(),
                        grads,
                        &mut extra,
                        "the generator's gradient all-reduce",
                    )?;
                    out.g_loss = extra[0] as f64;
                    out.rec = extra[1] as f64;
                    out.adv = extra[2] as f64;
                    Some(grads)
                }
                None => None,
            };
            if !out.g_loss.is_finite() {
                out.skipped = true;
                continue;
            }
            let grads = grads
                .unwrap_or_else(|| GradientsParams::from_grads(loss.backward(), self.generator()));
            let g = self.generator.take().ok_or("generator missing")?;
            self.generator = Some(self.opt_g.step(lr, g, grads));
        }
        Ok(out)
    }
}

/// Scalars `[1]` read back from the device in one transfer, in f64.
fn scalars<B: Backend>(ts: Vec<Tensor<B, 1>>) -> Vec<f64> {
    crate::model::load::to_f32_vec(Tensor::cat(ts, 0))
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The gradient penalty's interpolation weight for critic step `j`: uniform in [0, 1) from
/// `seed` (splitmix64).
pub fn gp_alpha(seed: u64, j: usize) -> f32 {
    let mut z = seed.wrapping_add((j as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Losses of a batch without training (validation), on the inner backend.
pub fn evaluate<B: Backend>(
    model: &Marlin<B>,
    critic: &Discriminator<B>,
    clip: Tensor<B, 5>,
    idx: &MaskIndices,
    losses: &LossConfig,
) -> Result<StepLosses, TrainError> {
    let real = model.target(clip.clone(), idx);
    let pred = model
        .forward_indices(clip, idx)
        .map_err(|e| e.to_string())?;
    let diff = pred.clone() - real.clone();
    let rec = to_scalar((diff.clone() * diff).mean());
    let (d_loss, adv) = if losses.adv_loss {
        let fake = critic.forward(pred).mean();
        let d = to_scalar(fake.clone() - critic.forward(real).mean());
        (d, -to_scalar(fake) * losses.adv_weight)
    } else {
        (0.0, 0.0)
    };
    // As the reference, validation has no gradient penalty.
    Ok(StepLosses {
        d_loss,
        rec,
        adv,
        g_loss: rec + adv,
        gp: 0.0,
        skipped: false,
    })
}

impl<B: AutodiffBackend> Pretrainer<B> {
    /// Validation losses of a batch with the current weights (no gradients).
    pub fn validate(
        &self,
        clip: Tensor<B, 5>,
        idx: &MaskIndices,
    ) -> Result<StepLosses, TrainError> {
        let g = self.generator().valid();
        let c = self.critic().valid();
        evaluate(&g, &c, clip.inner(), idx, &self.losses)
    }
}
