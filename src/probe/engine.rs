//! Fine-tuning on the training engine ([`crate::engine::finetune`]): the encoder's and the
//! head's weights and Adam's state live in the engine's buffers between steps; validation and
//! checkpoints read the weights back. Data-parallel runs average each step's gradients and
//! loss across the ranks before the update, as burn's path does.

use super::inputs::ProbeError;
use super::metrics::TaskKind;
use crate::distributed::Group;
use crate::engine::finetune::{FinetuneStep, HeadLoss};
use crate::engine::train::{Activations, TrainEngineError, TrainOps};
use crate::model::weights::StateDict;
use crate::model::MarlinConfig;
use crate::train::engine::{Averager, EngineDevice, EngineRefusal};
use std::sync::Arc;

/// A fine-tuning engine with its ops' type erased: what a run asks of it.
pub trait ClassifierEngine: Send {
    /// One step on clips `[B, 3, T, H, W]` (flat) with their targets (a class index per clip,
    /// or `B·K` values) at `lr`: the (rank-averaged) loss, or `None` when it was not finite and
    /// the update was skipped.
    fn step(&mut self, clips: &[f32], targets: &[f32], lr: f64) -> Result<Option<f64>, ProbeError>;
    /// The current weights: the encoder's official names and `fc.*`.
    fn weights(&mut self) -> Result<StateDict, ProbeError>;
    /// Average every step's gradients and loss across `group`.
    fn set_group(&mut self, group: Option<Arc<Group>>);
    /// Where the ops took a slower path than they could, one line each, oldest first.
    fn notes(&self) -> Vec<String>;
}

/// The head's loss of a task.
pub fn head_loss(kind: TaskKind) -> HeadLoss {
    match kind {
        TaskKind::Multiclass => HeadLoss::CrossEntropy,
        _ => HeadLoss::BinaryCrossEntropy,
    }
}

/// The engine's fine-tuning step for `cfg`'s encoder and the head in `sd` (the encoder's
/// official names and `fc.*`, as [`super::classifier::Classifier::to_state_dict`] writes) on
/// `device`.
pub fn finetune_engine(
    cfg: &MarlinConfig,
    sd: StateDict,
    kind: TaskKind,
    device: EngineDevice,
) -> Result<Box<dyn ClassifierEngine>, EngineRefusal> {
    FinetuneStep::supports(cfg)?;
    let loss = head_loss(kind);
    match device {
        EngineDevice::Cpu => {
            let ops = crate::engine::host_train::HostTrainOps::default();
            Ok(Box::new(EngineFinetuner::new(cfg, sd, loss, ops)))
        }
        #[cfg(feature = "cuda-engine")]
        EngineDevice::Cuda { ordinal, precision } => {
            let ops = crate::kernels::cuda::CudaTrainOps::new(ordinal, precision)?;
            Ok(Box::new(EngineFinetuner::new(cfg, sd, loss, ops)))
        }
        #[cfg(not(feature = "cuda-engine"))]
        EngineDevice::Cuda { .. } => Err(crate::device_error::DeviceError::Other(
            "this build has no CUDA engine (cargo feature cuda-engine)".into(),
        )
        .into()),
    }
}

/// Where the weights are between steps.
enum State {
    /// Before the first batch.
    Host(StateDict),
    /// In the ops' buffers of a step built for the run's batch size.
    Built(Box<FinetuneStep>),
}

/// The engine's side of a fine-tuning run on the ops `O`.
pub struct EngineFinetuner<O: TrainOps> {
    cfg: MarlinConfig,
    loss: HeadLoss,
    ops: O,
    state: State,
    group: Option<Arc<Group>>,
}

fn engine_err(e: impl std::fmt::Display) -> ProbeError {
    ProbeError::Engine(e.to_string())
}

impl<O: TrainOps> EngineFinetuner<O> {
    pub fn new(cfg: &MarlinConfig, sd: StateDict, loss: HeadLoss, ops: O) -> Self {
        Self {
            cfg: cfg.clone(),
            loss,
            ops,
            state: State::Host(sd),
            group: None,
        }
    }

    /// The step, built on the first batch for its size. A run's batches all have one size
    /// (the last incomplete one is dropped); another size is an error, not a silent reset of
    /// Adam's state.
    fn build_for(&mut self, clips: usize) -> Result<(), ProbeError> {
        let per_clip = 3 * self.cfg.clip_frames * self.cfg.img_size * self.cfg.img_size;
        let batch = clips / per_clip.max(1);
        match &self.state {
            State::Host(sd) => {
                let step = FinetuneStep::new_in(
                    &self.cfg,
                    sd,
                    batch,
                    self.loss,
                    Activations::of(&self.ops),
                )
                .map_err(engine_err)?;
                step.load(&mut self.ops).map_err(engine_err)?;
                self.state = State::Built(Box::new(step));
                Ok(())
            }
            State::Built(s) if s.batch == batch && clips == batch * per_clip => Ok(()),
            State::Built(s) => Err(engine_err(TrainEngineError::BatchSize {
                got: batch,
                want: s.batch,
            })),
        }
    }

    pub fn step(
        &mut self,
        clips: &[f32],
        targets: &[f32],
        lr: f64,
    ) -> Result<Option<f64>, ProbeError> {
        let group = self.group.clone();
        self.build_for(clips.len())?;
        let State::Built(step) = &mut self.state else {
            unreachable!("build_for built the step")
        };
        step.upload_clips(&mut self.ops, clips)
            .map_err(engine_err)?;
        let Some(grp) = group else {
            return step.step(&mut self.ops, targets, lr).map_err(engine_err);
        };
        // The ranks' gradients as the backward finishes them, then the loss, averaged before
        // the update (a failed collective: every rank skips it, the loss NaN everywhere).
        let mut avg = Averager::new(&grp);
        let out = step
            .step_with(&mut self.ops, targets, lr, &mut avg)
            .map_err(engine_err);
        match avg.failure {
            Some(e) => Err(e.into()),
            None => out,
        }
    }

    pub fn weights(&mut self) -> Result<StateDict, ProbeError> {
        match &self.state {
            State::Host(sd) => Ok(sd.clone()),
            State::Built(s) => s.state_dict(&mut self.ops).map_err(engine_err),
        }
    }
}

impl<O: TrainOps + Send> ClassifierEngine for EngineFinetuner<O> {
    fn step(&mut self, clips: &[f32], targets: &[f32], lr: f64) -> Result<Option<f64>, ProbeError> {
        EngineFinetuner::step(self, clips, targets, lr)
    }
    fn weights(&mut self) -> Result<StateDict, ProbeError> {
        EngineFinetuner::weights(self)
    }
    fn set_group(&mut self, group: Option<Arc<Group>>) {
        self.group = group;
    }
    fn notes(&self) -> Vec<String> {
        self.ops.notes()
    }
}
