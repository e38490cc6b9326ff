//! `marlin extract`: inputs -> `.npy` features, batched across videos, resumable.

use super::face_args::FaceArgs;
use super::model_args::ModelArgs;
use burn::tensor::backend::Backend;
use clap::Args;
use marlin::backend::{run_on_all, DeviceSet, MultiDeviceTask};
use marlin::extract::batch::{
    extract_to_npy_workers, write_failures_as, BatchOptions, FaceCrop, Failure, NpySummary,
};
use marlin::extract::inputs::{discover, DiscoverOptions, Discovered, Item, DEFAULT_GLOB};
use marlin::extract::manifest::{Manifest, Status};
use marlin::extract::shard::Shard;
use marlin::extract::{ExtractOptions, Input, Reduction};
use marlin::face::Detector;
use marlin::model::StateDict;
use marlin::util::write_atomic;
use marlin::video::VideoError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Video files, frame folders, or directories to walk for videos and frame folders.
    #[arg(required_unless_present = "list")]
    pub inputs: Vec<PathBuf>,
    /// A text file with one input path per line.
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Output folder: <input stem>.npy, relative paths kept for walked directories.
    #[arg(long, short)]
    pub out: PathBuf,
    /// File patterns of videos when walking a directory (comma-separated).
    #[arg(long, default_value = DEFAULT_GLOB)]
    pub glob: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Keep every N-th frame.
    #[arg(long, default_value_t = 2)]
    pub sample_rate: usize,
    /// Window step, in kept frames.
    #[arg(long, default_value_t = 16)]
    pub stride: usize,
    /// Save token features [N, D] per clip instead of the pooled [D].
    #[arg(long)]
    pub keep_seq: bool,
    /// Combine clip features: none, mean or max.
    #[arg(long, default_value = "none", value_parser = super::names::<Reduction>(&["none", "mean", "max"]))]
    pub reduction: Reduction,
    /// Clips per forward pass (across videos).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Faces in the wild: detect the face (built-in MTCNN, same device as the encoder), crop
    /// the reference's square around it and extract from the crops.
    #[arg(long)]
    pub crop_face: bool,
    #[command(flatten)]
    pub face: FaceArgs,
    /// Recompute outputs that already exist.
    #[arg(long)]
    pub overwrite: bool,
    /// Matrix products in fp32, tf32 (GPU tensor cores, f32 sums) or bf16 (f32 sums; on the
    /// CPU AVX-512 BF16, AMX tiles where it has them). LayerNorm, softmax, GELU and residuals
    /// stay f32. Default: fp32 on the CPU, tf32 on a GPU.
    #[arg(long)]
    pub precision: Option<marlin::kernels::Precision>,
    /// Threads per worker that decode videos (and find faces) ahead of the model, each taking
    /// the next input. Default: 1 on the CPU (the model has the cores), 4 on a GPU.
    #[arg(long)]
    pub decoders: Option<usize>,
    /// Model replicas in this process, each with its own batch queue and decoder thread,
    /// taking every N-th input (same outputs as one).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Process shard I of N (0-based) of the inputs, split by a stable hash of each output
    /// path: N processes with 0/N .. N-1/N cover every input once. Without it, a Slurm job
    /// array (SLURM_ARRAY_TASK_ID) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with
    /// MARLIN_SHARD_COUNT) sets it.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// No progress bar or notes (errors still go to stderr).
    #[arg(long, short)]
    pub quiet: bool,
}

struct Job {
    cfg: marlin::MarlinConfig,
    weights: PathBuf,
    items: Vec<Item>,
    opts: BatchOptions,
    quiet: bool,
    stop: Arc<AtomicBool>,
    /// Detect and crop faces first (`--crop-face`).
    face: Option<FaceArgs>,
    workers: usize,
    /// The devices as given, and the precision in effect on them.
    set: DeviceSet,
    precision: marlin::kernels::Precision,
}

impl MultiDeviceTask for Job {
    type Output = Result<NpySummary, String>;

    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output {
        let sd = StateDict::load(&self.weights).map_err(|e| e.to_string())?;
        let mut workers = Vec::new();
        let specs = self.set.specs(devices.len());
        for (device, &spec) in devices.iter().zip(&specs) {
            // The device's engine (the host kernels on the CPU; cuBLASLt, cuDNN and NVRTC
            // kernels on CUDA) holds the weights; burn's model stays unfilled beside it.
            let (model, report, note) = marlin::engine::load_for_features::<B>(
                &self.cfg,
                &sd,
                device,
                spec,
                self.precision,
            )
            .map_err(|e| e.to_string())?;
            if let (Some(n), false) = (&note, self.quiet) {
                eprintln!("note: {spec}: {n}");
            }
            if workers.is_empty() {
                for k in &report.unknown_keys {
                    eprintln!(
                        "warning: {}: unknown key '{k}' ignored",
                        self.weights.display()
                    );
                }
            }
            for _ in 0..self.workers.max(1) {
                let faces = match &self.face {
                    Some(f) => Some(FaceCrop {
                        detector: Detector::<B>::new(device, f.detect_options())
                            .map_err(|e| e.to_string())?,
                        track: f.track_options(),
                    }),
                    None => None,
                };
                // Clones on one device share the weights (burn tensors are reference-counted).
                workers.push((model.clone(), faces));
            }
        }
        let todo = self
            .items
            .iter()
            .filter(|it| self.opts.overwrite || !it.out.exists())
            .count();
        let bar = super::progress_bar(
            self.quiet,
            todo as u64,
            "{bar:30} {pos}/{len} videos  {msg}  elapsed {elapsed}  ETA {eta}",
        );
        let summary =
            extract_to_npy_workers(workers, &self.items, &self.opts, &self.stop, &mut |p| {
                bar.set_position(p.done as u64);
                bar.set_message(format!(
                    "{} clips, {:.2} clips/s",
                    p.clips,
                    p.clips_per_second()
                ));
            })
            .map_err(|e| e.to_string())?;
        bar.finish_and_clear();
        Ok(summary)
    }
}

/// Without FFmpeg, check the first videos to read up front (their headers only), so a
/// dataset that needs it gets one clear line, not one per file. H.264 in MP4/MOV needs none.
fn check_ffmpeg(videos: &[&Path]) -> Result<(), String> {
    if marlin::video::ffmpeg_available() {
        return Ok(());
    }
    if marlin::video::DecoderChoice::from_env() == marlin::video::DecoderChoice::Ffmpeg {
        return Err(VideoError::NoFfmpeg("ffmpeg").to_string());
    }
    for v in videos.iter().take(32) {
        if let Some(why) = marlin::video::needs_ffmpeg(v) {
            return Err(VideoError::NeedsFfmpeg {
                path: v.display().to_string(),
                why,
            }
            .to_string());
        }
    }
    Ok(())
}

pub fn run(args: ExtractArgs) -> Result<i32, String> {
    let opts = BatchOptions {
        extract: ExtractOptions {
            sample_rate: args.sample_rate,
            stride: args.stride,
            keep_seq: args.keep_seq,
            reduction: args.reduction,
            batch_size: args.batch_size,
            decoders: args
                .decoders
                .unwrap_or(if args.model.device == DeviceSet::Cpu {
                    1
                } else {
                    4
                }),
        },
        overwrite: args.overwrite,
    };
    opts.extract.check().map_err(|e| e.to_string())?;
    args.face.check()?;
    let kind = args.model.device.first();
    let (precision, note) = marlin::backend::set_precision(args.precision, kind);
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    let mut found = discover_inputs(&args.inputs, &args.list, &args.glob, &args.out)?;
    let shard = match &args.shard {
        Some(s) => Some(Shard::parse(s).map_err(|e| e.to_string())?),
        None => Shard::from_env().map_err(|e| e.to_string())?,
    };
    if let Some(sh) = &shard {
        let all = found.items.len();
        found.items = sh.select(found.items, &args.out);
        found.failures.retain(|f| sh.owns(&f.file));
        eprintln!("{}: {} of {all} inputs", sh.describe(), found.items.len());
    }
    let failures_name = shard.map_or("failures.json".to_string(), |s| s.failures_file());
    let mut failures = found.failures;
    let total = found.items.len();
    let todo = found
        .items
        .iter()
        .filter(|it| args.overwrite || !it.out.exists())
        .count();
    // FFmpeg only matters for the videos that will be read.
    let videos: Vec<&Path> = found
        .items
        .iter()
        .filter(|it| matches!(it.input, Input::Video(_)) && (args.overwrite || !it.out.exists()))
        .map(|it| it.input.path())
        .collect();
    if !videos.is_empty() {
        check_ffmpeg(&videos)?;
    }
    let mut summary = NpySummary {
        skipped: total - todo,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    if todo > 0 {
        let (cfg, weights) = args.model.resolve(false, !args.quiet)?;
        super::stop_on_ctrlc(&stop);
        let job = Job {
            cfg,
            weights,
            items: found.items,
            opts,
            quiet: args.quiet,
            stop: stop.clone(),
            face: args.crop_face.then(|| args.face.clone()),
            workers: args.workers,
            set: args.model.device.clone(),
            precision,
        };
        summary = run_on_all(&args.model.device, job).map_err(|e| e.to_string())??;
    }
    failures.append(&mut summary.failures);
    if !args.quiet {
        for n in &summary.notes {
            eprintln!("note: {n}");
        }
    }
    for w in &summary.warnings {
        eprintln!("note: {w}");
    }
    let code = report(
        &args.out,
        &failures_name,
        &failures,
        summary.written,
        total,
        summary.skipped,
        stop.load(Ordering::Relaxed),
        args.quiet,
    )?;
    match summary.device_error {
        Some(e) => Err(format!(
            "{e} (the outputs written so far are complete: the same command resumes after them)"
        )),
        None => Ok(code),
    }
}

/// End of a batch job: `failures.json` in `out` (removed when all went well), one line per
/// failure, a summary, and the exit code (0, 1 with failures, 130 when interrupted).
#[allow(clippy::too_many_arguments)] // each count is reported as is
pub(super) fn report(
    out: &Path,
    failures_name: &str,
    failures: &[Failure],
    written: usize,
    total: usize,
    skipped: usize,
    interrupted: bool,
    quiet: bool,
) -> Result<i32, String> {
    let report = out.join(failures_name);
    write_failures_as(out, failures_name, failures).map_err(|e| e.to_string())?;
    for f in failures {
        eprintln!("failed: {}", f.error);
    }
    if !quiet || !failures.is_empty() || interrupted {
        eprintln!(
            "{written} of {total} inputs written to {}, {skipped} skipped (already there), {} failed{}",
            out.display(),
            failures.len(),
            if failures.is_empty() {
                String::new()
            } else {
                format!(" (see {})", report.display())
            }
        );
    }
    if interrupted {
        eprintln!(
            "interrupted: finished outputs are complete; run the same command again to resume"
        );
        return Ok(130);
    }
    Ok(if failures.is_empty() { 0 } else { 1 })
}

#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// The extraction's output folder.
    pub out: PathBuf,
    /// The inputs, as given to `extract` (files, frame folders, directories to walk).
    #[arg(required_unless_present = "list")]
    pub inputs: Vec<PathBuf>,
    /// A text file with one input path per line, as given to `extract`.
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// File patterns of videos when walking a directory, as given to `extract`.
    #[arg(long, default_value = DEFAULT_GLOB)]
    pub glob: String,
}

/// The dataset as `extract` sees it (so `manifest` lists the same inputs and outputs).
fn discover_inputs(
    inputs: &[PathBuf],
    list: &Option<PathBuf>,
    glob: &str,
    out: &Path,
) -> Result<Discovered, String> {
    let opts = DiscoverOptions {
        list: list.clone(),
        glob: glob.to_string(),
        ..DiscoverOptions::new(out)
    };
    discover(inputs, &opts).map_err(|e| e.to_string())
}

/// `marlin manifest`: exit 0 when every input is done, 1 otherwise.
pub fn manifest(args: ManifestArgs) -> Result<i32, String> {
    let found = discover_inputs(&args.inputs, &args.list, &args.glob, &args.out)?;
    let m = Manifest::build(&found.items, &args.out).map_err(|e| e.to_string())?;
    let csv = args.out.join("manifest.csv");
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    write_atomic(&csv, m.to_csv().map_err(|e| e.to_string())?.as_bytes())
        .map_err(|e| format!("{}: {e}", csv.display()))?;
    let pq = args.out.join("manifest.parquet");
    write_atomic(&pq, &m.to_parquet().map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", pq.display()))?;
    let missing: Vec<&str> = m
        .rows
        .iter()
        .filter(|r| r.status == Status::Missing)
        .map(|r| r.input.as_str())
        .collect();
    let list = args.out.join("missing.txt");
    if missing.is_empty() {
        let _ = std::fs::remove_file(&list);
    } else {
        let text = missing.join("\n") + "\n";
        write_atomic(&list, text.as_bytes()).map_err(|e| format!("{}: {e}", list.display()))?;
    }
    let (done, failed) = (m.count(Status::Done), m.count(Status::Failed));
    outln!(
        "{} inputs: {done} done, {failed} failed, {} missing; {}",
        m.rows.len(),
        missing.len(),
        csv.display()
    );
    if !missing.is_empty() {
        outln!(
            "missing inputs are listed in {}: run the same extract command again (or the shards that own them); finished outputs are skipped",
            list.display()
        );
    }
    Ok(if done == m.rows.len() { 0 } else { 1 })
}
