//! The encoder's inference engine: features of clips as one fixed schedule of steps
//! ([`schedule`]) over a small ops interface ([`schedule::Ops`]), run by the host kernels
//! ([`host`], the CPU's extraction and the twin every test checks) or on a CUDA GPU
//! (`kernels::cuda`, cuBLASLt GEMMs with fused epilogues, cuDNN's fused attention, a few NVRTC
//! kernels, one CUDA graph per batch size).
//!
//! A [`FeatureEngine`] belongs to one model instance and computes in its own precision: two
//! models of different precisions in one process each keep theirs. [`crate::Marlin`] holds one
//! ([`crate::Marlin::with_engine`]); extraction (`extract`, `bench`, Python, the probe's
//! features) goes through it when it is there.

pub mod finetune;
pub mod host;
pub mod host_train;
pub mod schedule;
pub mod train;
pub mod weights;

use crate::device_error::DeviceError;
use crate::kernels::Precision;
use std::sync::Arc;

pub use schedule::{plan, Plan, Shape};
pub use weights::EncoderWeights;

/// Features of one batch in flight: read them with [`FeatureEngine::wait`].
#[derive(Debug)]
pub struct Pending {
    /// `[B, N or 1, D]`.
    pub shape: [usize; 3],
    inner: Ticket,
}

#[derive(Debug)]
enum Ticket {
    /// Computed already (the host engine computes in `submit`).
    Ready(Vec<f32>),
    /// A device's slot, read back by the engine that issued it.
    Slot(usize),
}

impl Pending {
    pub fn ready(shape: [usize; 3], values: Vec<f32>) -> Self {
        Self {
            shape,
            inner: Ticket::Ready(values),
        }
    }

    pub fn slot(shape: [usize; 3], slot: usize) -> Self {
        Self {
            shape,
            inner: Ticket::Slot(slot),
        }
    }

    /// The values, if computed already; else the slot to read them from.
    pub fn into_parts(self) -> Result<Vec<f32>, usize> {
        match self.inner {
            Ticket::Ready(v) => Ok(v),
            Ticket::Slot(s) => Err(s),
        }
    }
}

/// A model's encoder on one device, in one precision: clips in, features out.
pub trait FeatureEngine: Send + Sync + std::fmt::Debug {
    /// What runs, for reports (`"cuda:0 NVIDIA H100 80GB HBM3, bf16: cuBLASLt, cuDNN 9.13
    /// attention, CUDA graphs"`).
    fn describe(&self) -> String;
    /// The precision the products compute in.
    fn precision(&self) -> Precision;
    /// The clip size this engine takes: (frames, pixels per side).
    fn clip_size(&self) -> (usize, usize);
    /// Start the features of a batch: one `[3, T, H, W]` clip per slice, `[B, N, D]` per token
    /// (`keep_seq`) or pooled `[B, 1, D]`. A GPU engine returns before they are computed.
    fn submit(&self, clips: &[&[f32]], keep_seq: bool) -> Result<Pending, DeviceError>;
    /// The features of a submitted batch, row-major `pending.shape`.
    fn wait(&self, pending: Pending) -> Result<Vec<f32>, DeviceError>;
}

/// [`FeatureEngine::submit`] then [`FeatureEngine::wait`].
pub fn features(
    e: &dyn FeatureEngine,
    clips: &[&[f32]],
    keep_seq: bool,
) -> Result<(Vec<f32>, [usize; 3]), DeviceError> {
    let p = e.submit(clips, keep_seq)?;
    let shape = p.shape;
    Ok((e.wait(p)?, shape))
}

/// Which engine `--device cuda` extraction uses (`MARLIN_ENGINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// The schedule on the device (the default).
    Schedule,
    /// burn's generic ops on the device (`MARLIN_ENGINE=burn`): for comparison.
    Burn,
}

impl EngineChoice {
    pub fn from_env() -> Self {
        match std::env::var("MARLIN_ENGINE").as_deref() {
            Ok("burn") => Self::Burn,
            _ => Self::Schedule,
        }
    }
}

/// An engine (or none: burn's path) and a note for the user.
pub type Chosen = (Option<Arc<dyn FeatureEngine>>, Option<String>);

/// The engine for `model` on `device` in `precision`: the host twin on the CPU, the CUDA engine
/// on a CUDA GPU (in builds with it), `None` on devices that keep burn's path (Vulkan, Metal)
/// or when `MARLIN_ENGINE=burn`. The returned note (one line) says what was chosen instead of
/// what was asked, if anything.
pub fn for_device<B: burn::tensor::backend::Backend>(
    model: &crate::Marlin<B>,
    device: crate::backend::DeviceSpec,
    precision: Precision,
) -> Result<Chosen, EngineError> {
    use crate::backend::DeviceSpec;
    if EngineChoice::from_env() == EngineChoice::Burn {
        return Ok((None, None));
    }
    match device {
        DeviceSpec::Cpu => {
            let (p, note) = crate::kernels::cpu_effective_precision(precision);
            let e = host::HostEngine::new(EncoderWeights::of_model(model), p);
            Ok((Some(Arc::new(e)), note))
        }
        #[cfg(feature = "cuda-engine")]
        DeviceSpec::Cuda(i) => {
            let (e, note) = crate::kernels::cuda::CudaEngine::new(
                EncoderWeights::of_model(model),
                i,
                precision,
            )?;
            Ok((Some(Arc::new(e)), note))
        }
        _ => Ok((None, None)),
    }
}

/// `model` with the engine of `device` attached (as `marlin extract` runs): the host kernels'
/// schedule on the CPU, the CUDA engine on a CUDA GPU; unchanged where the device keeps burn's
/// path. The model keeps its own weights (reconstruction and training use them). Returns the
/// note of [`for_device`], if any.
///
/// ```
/// use marlin::backend::{Cpu, DeviceSpec};
/// use marlin::kernels::Precision;
/// use marlin::{Marlin, MarlinConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = std::path::Path::new("tests/fixtures/video");
/// let cfg = MarlinConfig::from_yaml_file(&dir.join("tiny224.yaml"))?;
/// let (model, _) = Marlin::<Cpu>::load_file(&cfg, &dir.join("tiny224.pt"), &[], &Default::default())?;
/// let (model, _note) = marlin::engine::attach(model, DeviceSpec::Cpu, Precision::F32)?;
/// assert!(model.engine.is_some());
/// # Ok(()) }
/// ```
pub fn attach<B: burn::tensor::backend::Backend>(
    model: crate::Marlin<B>,
    device: crate::backend::DeviceSpec,
    precision: Precision,
) -> Result<(crate::Marlin<B>, Option<String>), EngineError> {
    let (engine, note) = for_device(&model, device, precision)?;
    Ok(match engine {
        Some(e) => (model.with_engine(e), note),
        None => (model, note),
    })
}

/// A model for feature extraction on `device` (`spec`) from the state dict `sd`: with the
/// engine of that device attached ([`for_device`]) and the burn model's encoder left unfilled
/// (its weights live in the engine only), or, where no engine runs (Vulkan, Metal,
/// `MARLIN_ENGINE=burn`, or a CUDA engine that cannot start: the note says why), the burn model
/// as [`crate::Marlin::from_state_dict`] loads it. Also returns the load report and a note for
/// the user (one line), if any.
pub fn load_for_features<B: burn::tensor::backend::Backend>(
    cfg: &crate::MarlinConfig,
    sd: &crate::model::StateDict,
    device: &B::Device,
    spec: crate::backend::DeviceSpec,
    precision: Precision,
) -> Result<(crate::Marlin<B>, crate::model::LoadReport, Option<String>), crate::model::WeightsError>
{
    use crate::model::Part;
    let wants_engine = EngineChoice::from_env() == EngineChoice::Schedule
        && matches!(
            spec,
            crate::backend::DeviceSpec::Cpu | crate::backend::DeviceSpec::Cuda(_)
        );
    if wants_engine {
        let (host, report) = crate::Marlin::<crate::backend::Cpu>::from_state_dict(
            cfg,
            sd,
            &[Part::Encoder],
            &Default::default(),
        )?;
        match for_device(&host, spec, precision) {
            Ok((Some(e), note)) => {
                let m = crate::Marlin::<B>::new(cfg, &[Part::Encoder], device).with_engine(e);
                return Ok((m, report, note));
            }
            Ok((None, note)) => {
                let (m, report) =
                    crate::Marlin::<B>::from_state_dict(cfg, sd, &[Part::Encoder], device)?;
                return Ok((m, report, note));
            }
            Err(e) => {
                let note = format!("{e}; extracting with burn's kernels instead (slower)");
                let (m, report) =
                    crate::Marlin::<B>::from_state_dict(cfg, sd, &[Part::Encoder], device)?;
                return Ok((m, report, Some(note)));
            }
        }
    }
    let (m, report) = crate::Marlin::<B>::from_state_dict(cfg, sd, &[Part::Encoder], device)?;
    Ok((m, report, None))
}

/// Why an engine could not be built (each one line naming what to install or do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A library the engine needs is missing or too old.
    #[error("{0}")]
    Library(String),
    /// The device failed while the engine was being set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Unsupported(String),
}
