//! `marlin pretrain`: self-supervised pretraining on a prepared face dataset, resumable.

use super::run_on;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::ProgressBar;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::distributed::{DistOptions, Group};
use marlin::face::parser::{ParserKind, Parsing};
use marlin::model::MarlinConfig;
use marlin::train::prepare::{prepare_dataset, PrepareOptions, PrepareSummary};
use marlin::train::run::{initial_model, pretrain, EpochRow, Progress, RunOptions, StepPath};
use marlin::train::StepLosses;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Model and training config (reference YAML: sizes, mask_strategy, mask_percentage_target,
    /// adv_weight, d_steps/g_steps, learning_rate, optimizer, weight_decay).
    #[arg(long)]
    pub config: PathBuf,
    /// Dataset root: train_set.csv, val_set.csv, crop_images_DB/, face_parsing_images_DB/.
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder: checkpoint.safetensors, model.safetensors, metrics.csv, samples/.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Start from these weights (a MARLIN .pt/.ckpt/.safetensors; missing parts are fresh).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    pub epochs: usize,
    /// Clips per step (learning rates scale by batch / 256).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --out from its last checkpoint (same schedule, seed and batch).
    #[arg(long)]
    pub resume: bool,
    /// Steps per epoch at most (smoke runs).
    #[arg(long)]
    pub steps_per_epoch: Option<usize>,
    /// Validation clips per epoch at most.
    #[arg(long)]
    pub val_clips: Option<usize>,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Matrix products in fp32, tf32 (GPU tensor cores) or bf16 (mixed precision: f32 master
    /// weights and AdamW state, bf16 operands, f32 sums and losses). Default: fp32 on the CPU,
    /// tf32 on a GPU.
    #[arg(long)]
    pub precision: Option<marlin::kernels::Precision>,
    /// The training step: auto (the training engine's hand-scheduled step on the CPU in fp32,
    /// about 2x burn's there, where it covers the model; burn's autodiff step otherwise),
    /// engine (also on --device cuda in fp32, tf32 or bf16: its CUDA ops, not yet measured on
    /// a GPU),
    /// or burn. A resumed run keeps the step that wrote its checkpoint.
    #[arg(long, default_value = "auto", value_parser = super::names::<StepPath>(&StepPath::NAMES))]
    pub step: StepPath,
    #[command(flatten)]
    pub dist: DistArgs,
    #[arg(long, short)]
    pub quiet: bool,
}

/// Data-parallel training under torchrun or srun (see docs/scale.md).
#[derive(Args, Debug, Clone)]
pub struct DistArgs {
    /// Under torchrun or srun: how long a rank waits for the others (start, each step's
    /// all-reduce) before every rank stops with the name of the one that is gone or late.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub dist_timeout: u64,
    /// Under torchrun or srun: the training engine all-reduces the gradients in buckets of at
    /// least this size as its backward finishes them, overlapped with the rest of the backward
    /// (torch DDP's bucket_cap_mb). Default: 25 on CUDA (NCCL, on its own stream); on the CPU
    /// one all-reduce after the backward (Gloo sums on the cores the backward uses).
    #[arg(long, value_name = "MIB")]
    pub bucket_mb: Option<f64>,
}

impl DistArgs {
    /// The group of this launch (None outside torchrun/srun) and the rank's device.
    pub fn join(&self, device: DeviceSpec) -> Result<(Option<Arc<Group>>, DeviceSpec), String> {
        let opts = DistOptions {
            timeout: std::time::Duration::from_secs(self.dist_timeout.max(1)),
            bucket_mb: self.bucket_mb,
        };
        marlin::distributed::join(device, &opts).map_err(|e| e.to_string())
    }
}

struct Bar {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    quiet: bool,
}

impl Progress for Bar {
    fn step(&mut self, epoch: usize, done: usize, total: usize, l: &StepLosses, rate: f64) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.set_message(format!(
            "epoch {epoch}  rec {:.4}  adv {:.4}  critic {:.4}  {rate:.1} clips/s",
            l.rec, l.adv, l.d_loss
        ));
    }
    fn epoch(&mut self, r: &EpochRow) {
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!(
                    "epoch {}: lr {:.2e}  train rec {:.4}  val rec {:.4}  val critic {:.4}  {:.1} clips/s  {:.0} s ({:.1} s waiting for data)",
                    r.epoch, r.lr, r.train.rec, r.val.rec, r.val.d_loss, r.samples_per_s, r.seconds, r.data_wait_s
                )
            });
        }
    }
    fn stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn warning(&mut self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }
    fn note(&mut self, message: &str) {
        if !self.quiet {
            self.bar.suspend(|| eprintln!("note: {message}"));
        }
    }
}

struct Job {
    args: PretrainArgs,
    engine_device: marlin::train::engine::EngineDevice,
    cfg: MarlinConfig,
    stop: Arc<AtomicBool>,
    group: Option<Arc<Group>>,
}

impl BackendTask for Job {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.args;
        let resuming = a.resume && a.out.join("checkpoint.safetensors").is_file();
        let model = if resuming {
            None
        } else {
            Some(
                initial_model::<Autodiff<B>>(&self.cfg, a.init.as_ref(), a.seed, &device)
                    .map_err(|e| e.to_string())?,
            )
        };
        let bar = super::progress_bar(a.quiet, 0, "{bar:30} {pos}/{len} steps  {msg}  ETA {eta}");
        let mut progress = Bar {
            bar,
            stop: self.stop.clone(),
            quiet: a.quiet,
        };
        let opts = RunOptions {
            epochs: a.epochs,
            batch_size: a.batch_size,
            seed: a.seed,
            steps_per_epoch: a.steps_per_epoch,
            val_clips: a.val_clips,
            group: self.group.clone(),
            step: a.step,
            engine_device: self.engine_device,
        };
        let s = pretrain::<Autodiff<B>>(
            &self.cfg,
            model,
            &a.data,
            &a.out,
            &opts,
            a.resume,
            &mut progress,
            &device,
        )
        .map_err(|e| e.to_string())?;
        progress.bar.finish_and_clear();
        // (Every rank of a multi-process run has the same outcome: rank 0 says it.)
        if self.group.as_ref().is_some_and(|g| !g.is_main()) {
            return Ok(if s.interrupted { 130 } else { 0 });
        }
        if let Some(e) = s.resumed_from {
            eprintln!("resumed at epoch {e}");
        }
        if s.interrupted {
            eprintln!(
                "interrupted during epoch {}: the checkpoint of the last finished epoch is in {}; run again with --resume",
                s.last_epoch,
                a.out.display()
            );
            return Ok(130);
        }
        eprintln!(
            "{} epoch(s) trained; {} epochs done; weights in {}",
            s.epochs_run,
            s.last_epoch,
            a.out.join("model.safetensors").display()
        );
        if let (Some(g), false) = (&self.group, a.quiet) {
            let c = g.stats();
            eprintln!(
                "{}: {} collectives, {:.1} MB, {:.2} s in them (waits for slower ranks included)",
                g.engine_name(),
                c.calls,
                c.values as f64 * 4e-6,
                c.seconds
            );
        }
        Ok(0)
    }
}

pub fn run(args: PretrainArgs) -> Result<i32, String> {
    if args.batch_size == 0 || args.epochs == 0 {
        return Err("--batch-size and --epochs must be at least 1".into());
    }
    let cfg = MarlinConfig::from_yaml_file(&args.config).map_err(|e| e.to_string())?;
    let ckpt = args.out.join("checkpoint.safetensors");
    if ckpt.is_file() && !args.resume {
        return Err(format!(
            "{}: a run is already there; --resume continues it, or choose another --out",
            ckpt.display()
        ));
    }
    if args.resume && !ckpt.is_file() && !args.quiet {
        eprintln!(
            "note: no checkpoint in {}: starting a new run",
            args.out.display()
        );
    }
    let (group, device) = args.dist.join(args.device)?;
    let mut args = args;
    // Rank 0 alone reports.
    args.quiet |= group.as_ref().is_some_and(|g| !g.is_main());
    let (precision, note) = marlin::backend::set_precision(args.precision, device);
    if let (Some(n), false) = (note, args.quiet) {
        eprintln!("note: {n}");
    }
    let (step, engine_device) = args.step.resolve(device, precision)?;
    if let (Some(n), false) = (step.keep_burn_in_fp32(engine_device), args.quiet) {
        eprintln!("note: {n}");
    }
    args.step = step;
    if let (Some(g), false) = (&group, args.quiet) {
        eprintln!(
            "{} ranks ({}): global batch {} ({} per rank)",
            g.world(),
            g.engine_name(),
            g.world() * args.batch_size,
            args.batch_size
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_ctrlc(&stop);
    run_on(
        device,
        Job {
            args,
            engine_device,
            cfg,
            stop,
            group,
        },
    )?
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Raw videos, frame folders (e.g. YouTube Faces frame_images_DB/<person>/<video>), or
    /// directories to walk.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Dataset root to write: crop_images_DB/, face_parsing_images_DB/, train_set.csv,
    /// val_set.csv.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Side of the face crops.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Share of videos in val_set.csv.
    #[arg(long, default_value_t = 0.1)]
    pub val_ratio: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// File patterns of videos when walking a directory (comma-separated).
    #[arg(
        long,
        default_value = "*.mp4,*.avi,*.mov,*.mkv,*.webm,*.m4v,*.mpg,*.mpeg,*.flv"
    )]
    pub glob: String,
    #[command(flatten)]
    pub face: super::face_args::FaceArgs,
    /// Face parser of the label maps: mesh (468-point face mesh + person mask) or template (a
    /// layout fitted to the detector's 5 points).
    #[arg(long, default_value = "mesh", value_parser = super::names::<ParserKind>(&ParserKind::NAMES))]
    pub parser: ParserKind,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Redo videos already prepared.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

struct PrepareJob {
    args: PrepareArgs,
    stop: Arc<AtomicBool>,
}

impl BackendTask for PrepareJob {
    type Output = Result<PrepareSummary, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.args;
        let det = marlin::face::Detector::<B>::new(&device, a.face.detect_options())
            .map_err(|e| e.to_string())?;
        let parsing = Parsing::<B>::new(a.parser, &device).map_err(|e| e.to_string())?;
        let opts = PrepareOptions {
            size: a.size,
            track: a.face.track_options(),
            glob: a.glob.clone(),
            overwrite: a.overwrite,
            val_ratio: a.val_ratio,
            seed: a.seed,
            ..PrepareOptions::new(&a.out)
        };
        let bar = super::progress_bar(
            a.quiet,
            0,
            "{bar:30} {pos}/{len} videos  {per_sec}  ETA {eta}  {msg}",
        );
        let mut on_video = |done: usize, todo: usize, rel: &Path| {
            bar.set_length(todo as u64);
            bar.set_position(done as u64);
            bar.set_message(rel.display().to_string());
        };
        let stop = || self.stop.load(Ordering::Relaxed);
        let s = prepare_dataset(&a.inputs, &det, &parsing, &opts, &mut on_video, &stop);
        bar.finish_and_clear();
        s.map_err(|e| e.to_string())
    }
}

/// `marlin prepare`: crops, parsing maps and split CSVs for pretraining.
pub fn prepare(args: PrepareArgs) -> Result<i32, String> {
    args.face.check()?;
    let stop = Arc::new(AtomicBool::new(false));
    super::stop_on_ctrlc(&stop);
    let (out, quiet, device) = (args.out.clone(), args.quiet, args.device);
    let s = run_on(device, PrepareJob { args, stop })??;
    super::extract::report(
        &out,
        "failures.json",
        &s.failures,
        s.written,
        s.total,
        s.skipped,
        s.interrupted,
        quiet,
    )
}
