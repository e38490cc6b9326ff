//! `marlin split`, `marlin probe`, `marlin finetune`, `marlin predict`: downstream tasks on
//! MARLIN features, with reports.

use super::model_args::ModelArgs;
use super::run_on;
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::ProgressBar;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::probe::data::{make_split, Dataset};
use marlin::probe::metrics::table;
use marlin::probe::run::{FinetuneOptions, ProbeOptions, RunProgress, RunSummary};
use marlin::probe::saved::SavedClassifier;
use marlin::probe::train::{EpochLog, TrainOptions};
use marlin::train::run::StepPath;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// A CelebV-HQ root (with cropped/) or a labels CSV (`path,label...`).
    pub input: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing split files.
    #[arg(long)]
    pub overwrite: bool,
}

/// Options shared by `probe` and `finetune`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// A CelebV-HQ root (celebvhq_info.json, train/val/test.txt) or a folder with
    /// train.csv, val.csv and test.csv.
    #[arg(long)]
    pub labels: PathBuf,
    /// CelebV-HQ task: appearance (40 labels) or action (35).
    #[arg(long, default_value = "appearance")]
    pub task: String,
    /// Run folder: best.safetensors, classifier.json, metrics.csv, report.json, curves.png.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_epochs: Option<usize>,
    /// Seed of the head's initialisation, shuffling and clip sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Features from `marlin extract` (`<name>.npy`, `[clips, D]`).
    #[arg(long)]
    pub features: PathBuf,
    /// Combine the clips of a video: mean, max or min.
    #[arg(long, default_value = "mean")]
    pub reduction: String,
    #[command(flatten)]
    pub train: TrainArgs,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Frame step of the 16-frame training clips.
    #[arg(long, default_value_t = 2)]
    pub sample_rate: usize,
    #[command(flatten)]
    pub dist: super::pretrain::DistArgs,
    /// Matrix products in fp32, tf32 (GPU tensor cores) or bf16 (mixed precision, f32 master
    /// weights). Default: fp32 on the CPU, tf32 on a GPU.
    #[arg(long)]
    pub precision: Option<marlin::kernels::Precision>,
    /// The training step: auto (the training engine's hand-scheduled step on the CPU in fp32,
    /// where it covers the model; burn's autodiff step otherwise), engine (also on --device
    /// cuda in fp32, tf32 or bf16: its CUDA ops, not yet measured on a GPU), or burn.
    #[arg(long, default_value = "auto", value_parser = super::names::<StepPath>(&StepPath::NAMES))]
    pub step: StepPath,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A run folder of `probe` or `finetune`.
    #[arg(long)]
    pub classifier: PathBuf,
    /// Feature files (.npy) or videos / frame folders.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The CSV to write: path, then a probability per label (or class) and the prediction.
    #[arg(long, short)]
    pub out: PathBuf,
    /// For videos with a probe classifier: the model that made its features.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The epoch bar of a run, and Ctrl-C.
struct Bar {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    quiet: bool,
}

impl Bar {
    fn new(max_epochs: usize, quiet: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        super::stop_on_ctrlc(&stop);
        let bar = super::progress_bar(
            quiet,
            max_epochs as u64,
            "{bar:30} epoch {pos}/{len} (at most)  {msg}  elapsed {elapsed}",
        );
        Self { bar, stop, quiet }
    }
}

impl RunProgress for Bar {
    fn epoch(&mut self, log: &EpochLog, best: bool) {
        self.bar.inc(1);
        self.bar.set_message(format!(
            "lr {:.1e}  train loss {:.4}  val loss {:.4}  val AUC {}{}",
            log.lr,
            log.train_loss,
            log.val_loss,
            log.val_auc
                .map(|v| format!("{v:.4}"))
                .unwrap_or("n/a".into()),
            if best { " (best)" } else { "" }
        ));
    }

    fn stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn note(&mut self, message: &str) {
        if !self.quiet {
            self.bar.suspend(|| eprintln!("note: {message}"));
        }
    }

    fn warning(&mut self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }
}

/// Print how a run ended; the exit code (130 after Ctrl-C).
fn report(r: &RunSummary, bar: &Bar, quiet: bool, main: bool) -> i32 {
    bar.bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "stopped: {}; best epoch {} (validation AUC {})",
            r.stop,
            r.best_epoch,
            r.val.auc().map_or("n/a".into(), |v| format!("{v:.4}"))
        );
    }
    // (Every rank of a multi-process run has the same numbers: rank 0 prints them.)
    if main {
        outln!("test: {}", table(&r.test));
    }
    if r.interrupted {
        130
    } else {
        0
    }
}

pub fn split(args: SplitArgs) -> Result<i32, String> {
    for (p, n) in make_split(&args.input, args.seed, args.overwrite).map_err(|e| e.to_string())? {
        outln!("{}: {n}", p.display());
    }
    Ok(0)
}

/// The reference's settings unless given on the command line.
fn train_options(t: &TrainArgs, defaults: TrainOptions) -> TrainOptions {
    TrainOptions {
        lr: t.lr,
        batch_size: t.batch_size.unwrap_or(defaults.batch_size),
        max_epochs: t.max_epochs.unwrap_or(defaults.max_epochs),
        seed: t.seed,
        ..defaults
    }
}

fn describe(data: &Dataset) {
    eprintln!(
        "{:?} task, {} label(s)/class(es); {} train, {} val, {} test videos",
        data.kind,
        data.names.len(),
        data.train.len(),
        data.val.len(),
        data.test.len()
    );
}

struct ProbeJob {
    data: Dataset,
    opts: ProbeOptions,
    quiet: bool,
}

impl BackendTask for ProbeJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let mut bar = Bar::new(self.opts.train.max_epochs, self.quiet);
        let r = marlin::probe::run::probe::<B>(&self.data, &self.opts, &mut bar, &device)
            .map_err(|e| e.to_string())?;
        Ok(report(&r, &bar, self.quiet, true))
    }
}

pub fn probe(args: ProbeArgs) -> Result<i32, String> {
    let t = &args.train;
    let data = Dataset::load(&t.labels, &t.task).map_err(|e| e.to_string())?;
    if !t.quiet {
        describe(&data);
    }
    let mut opts = ProbeOptions::new(&args.features, &t.out);
    opts.reduction = args.reduction.clone();
    opts.train = train_options(t, opts.train);
    let job = ProbeJob {
        data,
        opts,
        quiet: t.quiet,
    };
    run_on(args.device, job)?
}

struct FinetuneJob {
    data: Dataset,
    opts: FinetuneOptions,
    quiet: bool,
}

impl BackendTask for FinetuneJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let mut bar = Bar::new(self.opts.train.max_epochs, self.quiet);
        let r = marlin::probe::run::finetune::<B>(&self.data, &self.opts, &mut bar, &device)
            .map_err(|e| e.to_string())?;
        let main = self.opts.train.group.as_ref().is_none_or(|g| g.is_main());
        Ok(report(&r, &bar, self.quiet, main))
    }
}

pub fn finetune(args: FinetuneArgs) -> Result<i32, String> {
    let t = &args.train;
    if args.sample_rate == 0 {
        return Err("--sample-rate must be at least 1".into());
    }
    let data = Dataset::load(&t.labels, &t.task).map_err(|e| e.to_string())?;
    data.check_videos().map_err(|e| e.to_string())?;
    let (group, device) = args.dist.join(args.model.device.single()?)?;
    // Rank 0 alone reports.
    let quiet = t.quiet || group.as_ref().is_some_and(|g| !g.is_main());
    let (precision, note) = marlin::backend::set_precision(args.precision, device);
    if let (Some(n), false) = (note, quiet) {
        eprintln!("note: {n}");
    }
    let (step, engine_device) = args.step.resolve(device, precision)?;
    if let (Some(n), false) = (step.keep_burn_in_fp32(engine_device), quiet) {
        eprintln!("note: {n}");
    }
    let (cfg, weights) = args.model.resolve(false, !quiet)?;
    let mut opts = FinetuneOptions::new(cfg, weights, &t.out);
    opts.step = step;
    opts.engine_device = engine_device;
    opts.sample_rate = args.sample_rate;
    opts.train = train_options(t, opts.train);
    opts.train.group = group;
    let job = FinetuneJob { data, opts, quiet };
    run_on(device, job)?
}

struct PredictJob {
    args: PredictArgs,
}

impl BackendTask for PredictJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.args;
        let clf = SavedClassifier::<B>::load(&a.classifier, &device).map_err(|e| e.to_string())?;
        let encoder = if clf.needs_encoder(&a.inputs) {
            let (cfg, w) = a.model.resolve(false, true)?;
            let sd = marlin::model::StateDict::load(&w).map_err(|e| e.to_string())?;
            // Features on the device's engine, in the precision `--precision` set.
            let spec = a.model.device.first();
            let p = match spec {
                DeviceSpec::Cpu => marlin::kernels::cpu_precision(),
                _ => marlin::kernels::gpu_precision(),
            };
            let (m, _, note) = marlin::engine::load_for_features::<B>(&cfg, &sd, &device, spec, p)
                .map_err(|e| e.to_string())?;
            if let Some(n) = note {
                eprintln!("note: {n}");
            }
            Some(m)
        } else {
            None
        };
        let failures = clf
            .predict_csv(&a.inputs, encoder.as_ref(), &a.out)
            .map_err(|e| e.to_string())?;
        for e in &failures {
            eprintln!("failed: {e}");
        }
        eprintln!(
            "{} of {} inputs predicted into {}",
            a.inputs.len() - failures.len(),
            a.inputs.len(),
            a.out.display()
        );
        Ok(if failures.is_empty() { 0 } else { 1 })
    }
}

pub fn predict(args: PredictArgs) -> Result<i32, String> {
    let device = args.model.device.single()?;
    run_on(device, PredictJob { args })?
}
