//! The pretraining step of a run on the training engine ([`crate::engine::train`]): the
//! weights and both optimisers' state live in the engine's buffers between steps; a batch of
//! another shape (a short last batch, another visible count) rebuilds the step's buffers from
//! the current state. Data-parallel runs average each update's gradients and losses across
//! the ranks before the update, as burn's path does.

use super::{LossConfig, StepLosses, TrainError};
use crate::distributed::{DistError, Group};
use crate::engine::train::{
    Activations, GradSync, OptimizerState, PretrainStep, StepShape, TrainEngineError, TrainOps, T,
};
use crate::kernels::Precision;
use crate::model::weights::StateDict;
use crate::model::{MarlinConfig, MaskIndices};
use std::sync::Arc;
use std::time::Instant;

/// Where the training engine's step runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineDevice {
    /// The host ops (fp32).
    #[default]
    Cpu,
    /// The CUDA ops on GPU `ordinal` in `precision` (fp32, tf32, or bf16 activations).
    Cuda {
        ordinal: usize,
        precision: Precision,
    },
}

/// A training engine's step with its ops' type erased: what a run asks of it.
pub trait EngineStep: Send {
    /// One training step on clips `[B, 3, T, H, W]` (flat) with visibility `idx` at `lr`.
    fn step(&mut self, clips: &[f32], idx: &MaskIndices, lr: f64)
        -> Result<StepLosses, TrainError>;
    /// The current weights (the peer's names): validation, the sample picture.
    fn weights(&mut self) -> Result<StateDict, TrainError>;
    /// The current weights and the optimisers' state: checkpoints.
    fn state(&mut self) -> Result<(StateDict, Option<OptimizerState>), TrainError>;
    /// Average every update's gradients and losses across `group`.
    fn set_group(&mut self, group: Option<Arc<Group>>);
    /// Where the ops took a slower path than they could, one line each, oldest first.
    fn notes(&self) -> Vec<String>;
    /// The bytes of the step's float buffers, counted from its layout, once a batch has built
    /// it: (parameters and their state, the batch's activations and scratch).
    fn buffer_bytes(&self) -> Option<(usize, usize)>;
}

impl<O: TrainOps + Send> EngineStep for EngineTrainer<O> {
    fn step(
        &mut self,
        clips: &[f32],
        idx: &MaskIndices,
        lr: f64,
    ) -> Result<StepLosses, TrainError> {
        EngineTrainer::step(self, clips, idx, lr)
    }
    fn weights(&mut self) -> Result<StateDict, TrainError> {
        EngineTrainer::weights(self)
    }
    fn state(&mut self) -> Result<(StateDict, Option<OptimizerState>), TrainError> {
        EngineTrainer::state(self)
    }
    fn set_group(&mut self, group: Option<Arc<Group>>) {
        self.group = group;
    }
    fn notes(&self) -> Vec<String> {
        self.ops.notes()
    }
    fn buffer_bytes(&self) -> Option<(usize, usize)> {
        match &self.state {
            State::Built(s) => Some(s.buffer_bytes()),
            State::Host(..) => None,
        }
    }
}

/// Why a training engine could not be made: the model is one it does not cover (burn's step
/// trains it), or the device failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineRefusal {
    #[error(transparent)]
    Model(#[from] TrainEngineError),
    #[error(transparent)]
    Device(#[from] crate::device_error::DeviceError),
}

/// The engine's step for `cfg`'s model with weights `sd` (the peer's names), resuming
/// `optimizer`'s state, on `device`.
pub fn engine_step(
    cfg: &MarlinConfig,
    sd: StateDict,
    optimizer: Option<OptimizerState>,
    losses: LossConfig,
    device: EngineDevice,
) -> Result<Box<dyn EngineStep>, EngineRefusal> {
    PretrainStep::supports(cfg, &sd, losses)?;
    match device {
        EngineDevice::Cpu => {
            let ops = crate::engine::host_train::HostTrainOps::default();
            Ok(Box::new(EngineTrainer::new(
                cfg, sd, optimizer, losses, ops,
            )?))
        }
        #[cfg(feature = "cuda-engine")]
        EngineDevice::Cuda { ordinal, precision } => {
            let ops = crate::kernels::cuda::CudaTrainOps::new(ordinal, precision)?;
            Ok(Box::new(EngineTrainer::new(
                cfg, sd, optimizer, losses, ops,
            )?))
        }
        #[cfg(not(feature = "cuda-engine"))]
        EngineDevice::Cuda { .. } => Err(crate::device_error::DeviceError::Other(
            "this build has no CUDA engine (cargo feature cuda-engine)".into(),
        )
        .into()),
    }
}

/// A data-parallel update's average across a group: the gradients in buckets as the backward
/// finishes them (overlapped with the rest of the backward where the ops can:
/// [`TrainOps::all_reduce_start`]), then the losses. A failed collective makes the losses NaN,
/// so no rank updates, and is kept in `failure` for the caller.
pub(crate) struct Averager<'g> {
    group: &'g Arc<Group>,
    pub(crate) failure: Option<DistError>,
}

impl<'g> Averager<'g> {
    pub(crate) fn new(group: &'g Arc<Group>) -> Self {
        Self {
            group,
            failure: None,
        }
    }
}

impl<O: TrainOps> GradSync<O> for Averager<'_> {
    fn bucket_len(&self) -> usize {
        self.group.bucket_len()
    }

    fn ready(&mut self, ops: &mut O, t: T) -> Result<(), O::Error> {
        if self.failure.is_none() {
            let t0 = Instant::now();
            if let Err(e) = ops.all_reduce_start(t, self.group)? {
                self.failure = Some(e);
            }
            self.group.add_waited(t0.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn finish(&mut self, ops: &mut O, _all: T, losses: &mut [f32]) -> Result<(), O::Error> {
        let t0 = Instant::now();
        if let Err(e) = ops.all_reduce_wait()? {
            self.failure.get_or_insert(e);
        }
        if self.failure.is_none() {
            if let Err(e) = self.group.all_reduce_mean(losses, "the losses") {
                self.failure = Some(e);
            }
        }
        self.group.add_waited(t0.elapsed().as_secs_f64());
        if self.failure.is_some() {
            losses.fill(f32::NAN);
        }
        Ok(())
    }
}

/// Where the weights and optimiser state are between steps.
enum State {
    /// Before the first batch: the weights (and the optimisers' state of a resumed run).
    Host(StateDict, Option<OptimizerState>),
    /// In the ops' buffers of a step built for one batch shape.
    Built(Box<PretrainStep>),
}

/// The engine's side of a pretraining run: a step on the ops `O` (the CPU twin today).
pub struct EngineTrainer<O: TrainOps> {
    cfg: MarlinConfig,
    losses: LossConfig,
    ops: O,
    state: State,
    group: Option<Arc<Group>>,
}

fn dev<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Run(format!("training engine: {e}"))
}

fn engine_error(e: TrainEngineError) -> TrainError {
    TrainError::Run(format!("training engine: {e}"))
}

impl<O: TrainOps> EngineTrainer<O> {
    /// A trainer from the generator's and critic's weights `sd` (the peer's names) and, when
    /// resuming, the optimisers' state. Fails with the engine's reason when it does not cover
    /// the model (burn's path trains it).
    pub fn new(
        cfg: &MarlinConfig,
        sd: StateDict,
        optimizer: Option<OptimizerState>,
        losses: LossConfig,
        ops: O,
    ) -> Result<Self, TrainEngineError> {
        PretrainStep::supports(cfg, &sd, losses)?;
        Ok(Self {
            cfg: cfg.clone(),
            losses,
            ops,
            state: State::Host(sd, optimizer),
            group: None,
        })
    }

    /// The step for batches of `shape`, built (from the current state) when the last one was
    /// for another shape.
    fn step_for(&mut self, shape: StepShape) -> Result<&mut PretrainStep, TrainError> {
        let rebuild = !matches!(&self.state, State::Built(s) if s.shape == shape);
        if rebuild {
            let (sd, opt) = self.state()?;
            let act = Activations::of(&self.ops);
            let mut step = PretrainStep::new_in(&self.cfg, &sd, shape, self.losses, act)
                .map_err(engine_error)?;
            step.load(&mut self.ops).map_err(dev)?;
            if let Some(o) = &opt {
                step.load_optimizer_state(&mut self.ops, o)
                    .map_err(engine_error)?;
            }
            self.state = State::Built(Box::new(step));
        }
        match &mut self.state {
            State::Built(s) => Ok(s),
            // Built just above when it was not.
            State::Host(..) => unreachable!("the step was built above"),
        }
    }

    /// One training step on clips `[B, 3, T, H, W]` (flat) with visibility `idx` at learning
    /// rate `lr`.
    pub fn step(
        &mut self,
        clips: &[f32],
        idx: &MaskIndices,
        lr: f64,
    ) -> Result<StepLosses, TrainError> {
        let b = idx.batch.max(1);
        let shape = StepShape {
            batch: idx.batch,
            visible: idx.visible.len() / b,
            masked: idx.masked.len() / b,
        };
        let group = self.group.clone();
        self.step_for(shape)?;
        let State::Built(step) = &mut self.state else {
            unreachable!("step_for built the step")
        };
        step.upload_batch(&mut self.ops, clips, idx)
            .map_err(engine_error)?;
        let Some(grp) = group else {
            return step.step(&mut self.ops, lr).map_err(dev);
        };
        // The ranks' gradients as the backward finishes them, then the losses, averaged
        // before each update.
        let mut avg = Averager::new(&grp);
        let out = step.step_with(&mut self.ops, lr, &mut avg).map_err(dev);
        match avg.failure {
            Some(e) => Err(e.into()),
            None => out,
        }
    }

    /// The current weights (generator and critic, in the peer's names).
    pub fn weights(&mut self) -> Result<StateDict, TrainError> {
        match &self.state {
            State::Host(sd, _) => Ok(sd.clone()),
            State::Built(s) => s.state_dict(&mut self.ops).map_err(dev),
        }
    }

    /// The current weights and the optimisers' state, for checkpoints and a rebuild.
    pub fn state(&mut self) -> Result<(StateDict, Option<OptimizerState>), TrainError> {
        match &self.state {
            State::Host(sd, opt) => Ok((sd.clone(), opt.clone())),
            State::Built(s) => Ok((
                s.state_dict(&mut self.ops).map_err(dev)?,
                Some(s.optimizer_state(&mut self.ops).map_err(dev)?),
            )),
        }
    }
}
