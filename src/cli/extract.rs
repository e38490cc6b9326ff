//! `marlin extract`: inputs -> `.npy` features, batched across videos, resumable.

use super::face_args::FaceArgs;
use super::model_args::ModelArgs;
use super::run_on;
use burn::tensor::backend::Backend;
use clap::Args;
use marlin::backend::BackendTask;
use marlin::extract::batch::{
    extract_to_npy, write_failures, BatchOptions, FaceCrop, Failure, NpySummary,
};
use marlin::extract::inputs::{discover, DiscoverOptions, Item, DEFAULT_GLOB};
use marlin::extract::{ExtractOptions, Input, Reduction};
use marlin::face::Detector;
use marlin::model::{Marlin, Part};
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
}

impl BackendTask for Job {
    type Output = Result<NpySummary, String>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (model, report) =
            Marlin::<B>::load_file(&self.cfg, &self.weights, &[Part::Encoder], &device)
                .map_err(|e| e.to_string())?;
        for k in &report.unknown_keys {
            eprintln!(
                "warning: {}: unknown key '{k}' ignored",
                self.weights.display()
            );
        }
        let faces = match &self.face {
            Some(f) => Some(FaceCrop {
                detector: Detector::<B>::new(&device, f.detect_options())
                    .map_err(|e| e.to_string())?,
                track: f.track_options(),
            }),
            None => None,
        };
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
        let summary = extract_to_npy(
            &model,
            &self.items,
            &self.opts,
            faces.as_ref(),
            &self.stop,
            &mut |p| {
                bar.set_position(p.done as u64);
                bar.set_message(format!(
                    "{} clips, {:.2} clips/s",
                    p.clips,
                    p.clips_per_second()
                ));
            },
        )
        .map_err(|e| e.to_string())?;
        bar.finish_and_clear();
        Ok(summary)
    }
}

/// Check once that FFmpeg is there, so a fresh machine gets one clear line, not one per file.
fn check_ffmpeg() -> Result<(), String> {
    for tool in ["ffprobe", "ffmpeg"] {
        if let Err(e) = std::process::Command::new(tool)
            .arg("-version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            if e.kind() == std::io::ErrorKind::NotFound {
                return Err(VideoError::NoFfmpeg(tool).to_string());
            }
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
        },
        overwrite: args.overwrite,
    };
    opts.extract.check().map_err(|e| e.to_string())?;
    args.face.check()?;
    let found = discover(
        &args.inputs,
        &DiscoverOptions {
            list: args.list.clone(),
            glob: args.glob.clone(),
            ..DiscoverOptions::new(&args.out)
        },
    )
    .map_err(|e| e.to_string())?;
    let mut failures = found.failures;
    let total = found.items.len();
    let todo = found
        .items
        .iter()
        .filter(|it| args.overwrite || !it.out.exists())
        .count();
    // FFmpeg only matters for the videos that will be read.
    if found
        .items
        .iter()
        .any(|it| matches!(it.input, Input::Video(_)) && (args.overwrite || !it.out.exists()))
    {
        check_ffmpeg()?;
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
        };
        summary = run_on(args.model.device, job)??;
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
    report(
        &args.out,
        &failures,
        summary.written,
        total,
        summary.skipped,
        stop.load(Ordering::Relaxed),
        args.quiet,
    )
}

/// End of a batch job: `failures.json` in `out` (removed when all went well), one line per
/// failure, a summary, and the exit code (0, 1 with failures, 130 when interrupted).
pub(super) fn report(
    out: &Path,
    failures: &[Failure],
    written: usize,
    total: usize,
    skipped: usize,
    interrupted: bool,
    quiet: bool,
) -> Result<i32, String> {
    let report = out.join("failures.json");
    write_failures(out, failures).map_err(|e| e.to_string())?;
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
