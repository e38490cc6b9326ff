//! A downstream run end to end, as `marlin probe` and `marlin finetune` make it: train with the
//! reference's schedule and write the run folder that [`super::saved::SavedClassifier`] loads:
//! `best.safetensors` (after each improving epoch), `metrics.csv` (after each epoch),
//! `classifier.json`, `report.json` and `curves.png` (at the end).
//!
//! ```no_run
//! use marlin::backend::Cpu;
//! use marlin::probe::data::Dataset;
//! use marlin::probe::run::{probe, ProbeOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let data = Dataset::load("labels/".as_ref(), "appearance")?;
//! let opts = ProbeOptions::new("features/", "runs/lp");
//! let summary = probe::<Cpu>(&data, &opts, &mut (), &Default::default())?;
//! println!("best epoch {}, test AUC {:?}", summary.best_epoch, summary.test.auc());
//! # Ok(()) }
//! ```

use super::classifier::Classifier;
use super::data::{DataError, Dataset};
use super::engine::finetune_engine;
use super::features::load_features;
use super::metrics::Metrics;
use super::saved::ClassifierInfo;
use super::train::{
    train_with, ClipSpec, EngineRun, EpochLog, Inputs, ProbeError, RunHooks, TrainOptions,
};
use crate::model::{Marlin, MarlinConfig, Part, WeightsError};
use crate::train::engine::{EngineDevice, EngineRefusal};
use crate::train::run::StepPath;
use crate::util::write_atomic;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

/// Why a run could not start or finish. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] ProbeError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The run folder or one of its files cannot be written.
    #[error("{path}: {msg}")]
    Write { path: String, msg: String },
    #[error("{0}")]
    Options(String),
}

/// Linear probing on features from `marlin extract`.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// The folder of `<name>.npy` features (`[clips, D]` or `[D]`).
    pub features: PathBuf,
    /// How a video's clips are combined: mean, max or min.
    pub reduction: String,
    /// The run folder.
    pub out: PathBuf,
    /// The reference's probing settings by default (batch 32, at most 200 epochs).
    pub train: TrainOptions,
}

impl ProbeOptions {
    pub fn new(features: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            features: features.into(),
            reduction: "mean".into(),
            out: out.into(),
            train: TrainOptions::default(),
        }
    }
}

/// Fine-tuning the encoder with the head on 16-frame clips of the videos.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub config: MarlinConfig,
    /// The encoder's weights (any checkpoint format).
    pub weights: PathBuf,
    /// Frame step of the training clips.
    pub sample_rate: usize,
    pub out: PathBuf,
    /// The reference's fine-tuning settings by default (batch 8, at most 20 epochs).
    pub train: TrainOptions,
    /// Which step trains: burn's autodiff (the default here), the training engine's
    /// (`Engine`), or the engine where it covers the model (`Auto`, with a note otherwise).
    /// `StepPath::resolve` picks it for a device and precision as the CLI does.
    pub step: StepPath,
    /// Where the training engine's step runs.
    pub engine_device: EngineDevice,
}

impl FinetuneOptions {
    pub fn new(config: MarlinConfig, weights: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            config,
            weights: weights.into(),
            sample_rate: 2,
            out: out.into(),
            train: TrainOptions {
                batch_size: 8,
                max_epochs: 20,
                ..TrainOptions::default()
            },
            step: StepPath::Burn,
            engine_device: EngineDevice::Cpu,
        }
    }
}

/// What a caller sees of a run while it trains. `()` sees nothing.
pub trait RunProgress {
    /// After each epoch; `best` when it improved the validation AUC (and was saved).
    fn epoch(&mut self, _log: &EpochLog, _best: bool) {}
    /// Checked between batches: true ends the run after saving what it has (Ctrl-C).
    fn stop(&self) -> bool {
        false
    }
    /// Something worth knowing about the run (which step trains it).
    fn note(&mut self, _message: &str) {}
    /// Something the user must know (the steps wait for their clips).
    fn warning(&mut self, _message: &str) {}
}

impl RunProgress for () {}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    /// Why training stopped (max epochs, learning rate floor, interrupted).
    pub stop: String,
    /// True when [`RunProgress::stop`] ended it.
    pub interrupted: bool,
    pub val: Metrics,
    pub test: Metrics,
    /// What `classifier.json` holds.
    pub info: ClassifierInfo,
}

/// Train a linear head on `data`'s features and write the run folder.
pub fn probe<B: Backend>(
    data: &Dataset,
    opts: &ProbeOptions,
    progress: &mut dyn RunProgress,
    device: &B::Device,
) -> Result<RunSummary, RunError> {
    let paths = data.feature_paths(&opts.features)?;
    let inputs = load_features(&paths, data, &opts.reduction)?;
    let Inputs::Features { d, .. } = &inputs else {
        return Err(RunError::Options("probing needs features".into()));
    };
    let d = *d;
    let model = Classifier::<Autodiff<B>>::new(None, d, data.width(), opts.train.seed, device);
    let info = ClassifierInfo {
        reduction: Some(opts.reduction.clone()),
        ..new_info("probe", data, d)
    };
    run(
        model,
        None,
        data,
        &inputs,
        &opts.train,
        &opts.out,
        info,
        progress,
        device,
    )
}

/// Fine-tune the encoder of `opts.weights` with a head on `data`'s videos and write the run
/// folder.
pub fn finetune<B: Backend>(
    data: &Dataset,
    opts: &FinetuneOptions,
    progress: &mut dyn RunProgress,
    device: &B::Device,
) -> Result<RunSummary, RunError> {
    if opts.sample_rate == 0 {
        return Err(RunError::Options("--sample-rate must be at least 1".into()));
    }
    data.check_videos()?;
    let cfg = &opts.config;
    let (marlin, _) =
        Marlin::<Autodiff<B>>::load_file(cfg, &opts.weights, &[Part::Encoder], device)?;
    let d = cfg.encoder.embed_dim;
    let model = Classifier::new(
        Some(marlin.encoder),
        d,
        data.width(),
        opts.train.seed,
        device,
    );
    let inputs = Inputs::Clips(ClipSpec {
        clip_frames: cfg.clip_frames,
        sample_rate: opts.sample_rate,
        size: cfg.img_size,
    });
    let info = ClassifierInfo {
        config: Some(cfg.clone()),
        sample_rate: Some(opts.sample_rate),
        ..new_info("finetune", data, d)
    };
    let engine = match opts.step {
        StepPath::Burn => None,
        StepPath::Engine | StepPath::Auto => {
            let sd = model.to_state_dict("finetune");
            match finetune_engine(cfg, sd, data.kind, opts.engine_device) {
                Ok(engine) => Some(EngineRun {
                    engine,
                    config: cfg.clone(),
                }),
                Err(e @ EngineRefusal::Model(_)) if opts.step == StepPath::Auto => {
                    progress.note(&e.to_string());
                    None
                }
                Err(e) => return Err(ProbeError::Engine(e.to_string()).into()),
            }
        }
    };
    run(
        model,
        engine,
        data,
        &inputs,
        &opts.train,
        &opts.out,
        info,
        progress,
        device,
    )
}

/// What `classifier.json` records before training: the mode, the task and a `d`-wide head.
fn new_info(mode: &str, data: &Dataset, d: usize) -> ClassifierInfo {
    ClassifierInfo {
        mode: mode.into(),
        task: data.kind,
        names: data.names.clone(),
        feature_dim: d,
        reduction: None,
        config: None,
        sample_rate: None,
        best_epoch: 0,
        val_auc: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn run<B: Backend>(
    model: Classifier<Autodiff<B>>,
    engine: Option<EngineRun>,
    data: &Dataset,
    inputs: &Inputs,
    opts: &TrainOptions,
    out: &Path,
    mut info: ClassifierInfo,
    progress: &mut dyn RunProgress,
    device: &B::Device,
) -> Result<RunSummary, RunError> {
    let main = opts.group.as_ref().is_none_or(|g| g.is_main());
    if main {
        std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    }
    let mut dir = RunDir {
        out,
        name: info.mode.clone(),
        csv: "epoch,lr,train_loss,val_loss,val_accuracy,val_auc,seconds,data_wait_s\n".into(),
        progress,
    };
    let r = train_with::<Autodiff<B>>(model, engine, data, inputs, opts, &mut dir, device)?;
    info.best_epoch = r.best_epoch;
    info.val_auc = r.val.auc();
    let summary = RunSummary {
        interrupted: dir.progress.stop(),
        epochs: r.epochs,
        best_epoch: r.best_epoch,
        stop: r.stop,
        val: r.val,
        test: r.test,
        info,
    };
    if main {
        finish(out, &summary)?;
    }
    Ok(summary)
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Write {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// The run folder as training goes: metrics.csv after each epoch, the best checkpoint when
/// it improves.
struct RunDir<'a> {
    out: &'a Path,
    name: String,
    csv: String,
    progress: &'a mut dyn RunProgress,
}

impl<B: Backend> RunHooks<B> for RunDir<'_> {
    fn epoch(
        &mut self,
        log: &EpochLog,
        improved: Option<&Classifier<B>>,
    ) -> Result<(), ProbeError> {
        let report = |msg: String| ProbeError::Report(msg);
        self.csv += &format!(
            "{},{:e},{:.6},{:.6},{:.6},{},{:.2},{:.2}\n",
            log.epoch,
            log.lr,
            log.train_loss,
            log.val_loss,
            log.val_accuracy,
            log.val_auc.map(|v| format!("{v:.6}")).unwrap_or_default(),
            log.seconds,
            log.data_wait_s
        );
        let p = self.out.join("metrics.csv");
        write_atomic(&p, self.csv.as_bytes())
            .map_err(|e| report(format!("{}: {e}", p.display())))?;
        if let Some(m) = improved {
            let p = self.out.join("best.safetensors");
            m.to_state_dict(&self.name)
                .save_safetensors(&p, None)
                .map_err(|e| report(e.to_string()))?;
        }
        self.progress.epoch(log, improved.is_some());
        Ok(())
    }

    fn stop(&self) -> bool {
        self.progress.stop()
    }

    fn warning(&mut self, message: &str) {
        self.progress.warning(message);
    }
}

/// The reports of a finished run: classifier.json, report.json, curves.png.
fn finish(out: &Path, s: &RunSummary) -> Result<(), RunError> {
    let w = |name: &str, value: serde_json::Value| {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(&value).map_err(|e| write_err(&p, e))?;
        write_atomic(&p, text.as_bytes()).map_err(|e| write_err(&p, e))
    };
    w("classifier.json", json(&s.info))?;
    w(
        "report.json",
        serde_json::json!({
            "best_epoch": s.best_epoch,
            "stopped": s.stop,
            "val": json(&s.val),
            "test": json(&s.test),
            "epochs": s.epochs,
        }),
    )?;
    let png = out.join("curves.png");
    super::plot::curves(&s.epochs, &png).map_err(|e| write_err(&png, e))
}

/// A plain struct as JSON (they always serialise; null otherwise).
fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}
