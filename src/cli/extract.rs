//! `marlin extract`: inputs -> `.npy` features, batched across videos, resumable.

use super::face_args::FaceArgs;
use super::model_args::ModelArgs;
use crate::backend::{run_on, BackendTask};
use crate::extract::{
    assemble, face_track, read_clips, ClipData, ClipStats, ExtractOptions, Input, Reduction,
};
use crate::face::Detector;
use crate::model::{Marlin, Part};
use crate::util::write_atomic;
use crate::video::{self, VideoError};
use burn::tensor::backend::Backend;
use clap::Args;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

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
    #[arg(
        long,
        default_value = "*.mp4,*.avi,*.mov,*.mkv,*.webm,*.m4v,*.mpg,*.mpeg,*.flv"
    )]
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
    #[arg(long, value_enum, default_value_t = Reduction::None)]
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

/// One unit of work: an input and where its output goes.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub input: Input,
    pub out: PathBuf,
}

fn glob_set(globs: &str) -> Result<globset::GlobSet, String> {
    let mut b = globset::GlobSetBuilder::new();
    for g in globs.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        b.add(
            globset::GlobBuilder::new(g)
                .case_insensitive(true)
                .build()
                .map_err(|e| format!("--glob '{g}': {e}"))?,
        );
    }
    b.build().map_err(|e| e.to_string())
}

fn has_images(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().is_file() && video::is_image(&e.path()))
        })
        .unwrap_or(false)
}

fn npy_name(rel: &Path) -> PathBuf {
    let mut s = rel.as_os_str().to_owned();
    if rel.extension().is_some() && !rel.as_os_str().is_empty() {
        return rel.with_extension("npy");
    }
    s.push(".npy");
    PathBuf::from(s)
}

/// Expand command-line inputs (files, frame folders, directories to walk for videos matching
/// `glob` and frame folders, a `list` file) into items whose output is `out` joined with
/// `name(relative path)`; paths that do not exist become failures.
pub(super) fn discover(
    inputs: &[PathBuf],
    list: Option<&Path>,
    glob: &str,
    out: &Path,
    name: &dyn Fn(&Path) -> PathBuf,
    failures: &mut Vec<(String, String)>,
) -> Result<Vec<Item>, String> {
    let globs = glob_set(glob)?;
    let mut paths = inputs.to_vec();
    if let Some(list) = list {
        let text = std::fs::read_to_string(list)
            .map_err(|e| format!("{}: cannot read list: {e}", list.display()))?;
        paths.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(PathBuf::from),
        );
    }
    let mut items = Vec::new();
    for p in paths {
        if !p.exists() {
            failures.push((
                p.display().to_string(),
                VideoError::Missing(p.display().to_string()).to_string(),
            ));
            continue;
        }
        let file_name = PathBuf::from(p.file_name().unwrap_or(p.as_os_str()));
        if p.is_file() {
            items.push(Item {
                input: Input::Video(p.clone()),
                out: out.join(name(&file_name)),
            });
        } else if has_images(&p) {
            items.push(Item {
                input: Input::Frames(p.clone()),
                out: out.join(name(&file_name)),
            });
        } else {
            let before = items.len();
            for e in walkdir::WalkDir::new(&p)
                .sort_by_file_name()
                .into_iter()
                .filter_map(|e| e.ok())
            {
                let ep = e.path();
                let rel = ep.strip_prefix(&p).unwrap_or(ep).to_path_buf();
                if e.file_type().is_file()
                    && globs.is_match(ep.file_name().map(Path::new).unwrap_or(ep))
                {
                    items.push(Item {
                        input: Input::Video(ep.to_path_buf()),
                        out: out.join(name(&rel)),
                    });
                } else if e.file_type().is_dir() && ep != p && has_images(ep) {
                    items.push(Item {
                        input: Input::Frames(ep.to_path_buf()),
                        out: out.join(name(&rel)),
                    });
                }
            }
            if items.len() == before {
                failures.push((
                    p.display().to_string(),
                    format!(
                        "{}: no videos matching '{}' and no frame folders inside",
                        p.display(),
                        glob
                    ),
                ));
            }
        }
    }
    // Two inputs that would write the same output: keep the first, fail the others.
    let mut seen = BTreeSet::new();
    let mut unique = Vec::new();
    for it in items {
        if seen.insert(it.out.clone()) {
            unique.push(it);
        } else {
            failures.push((
                it.input.path().display().to_string(),
                format!(
                    "{}: another input already writes {}",
                    it.input.path().display(),
                    it.out.display()
                ),
            ));
        }
    }
    Ok(unique)
}

enum Msg {
    Clip(usize, ClipData),
    Done(usize, Result<ClipStats, VideoError>),
}

struct Job {
    cfg: crate::MarlinConfig,
    weights: PathBuf,
    items: Vec<Item>,
    opts: ExtractOptions,
    quiet: bool,
    stop: Arc<AtomicBool>,
    /// Detect and crop faces first (`--crop-face`).
    face: Option<FaceArgs>,
}

#[derive(Default)]
struct Outcome {
    written: usize,
    clips: usize,
    failures: Vec<(String, String)>,
    notes: Vec<String>,
}

impl BackendTask for Job {
    type Output = Result<Outcome, String>;

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
        let bar = super::progress_bar(
            self.quiet,
            self.items.len() as u64,
            "{bar:30} {pos}/{len} videos  {msg}  elapsed {elapsed}  ETA {eta}",
        );
        let (tx, rx) = mpsc::sync_channel::<Msg>(2 * self.opts.batch_size.max(1));
        let items = Arc::new(self.items);
        let (clip_frames, size) = (self.cfg.clip_frames, self.cfg.img_size);
        let opts = self.opts.clone();
        let stop = self.stop.clone();
        let decode_items = items.clone();
        let detector = match &self.face {
            Some(f) => {
                Some(Detector::<B>::new(&device, f.detect_options()).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let track_opts = self.face.as_ref().map(|f| f.track_options());
        // Decoding (and face detection) runs in its own thread, overlapping the model.
        let decoder = std::thread::spawn(move || {
            for (i, it) in decode_items.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let halt = || stop.load(Ordering::Relaxed);
                let track = match (&detector, &track_opts) {
                    (Some(d), Some(t)) => {
                        match face_track(&it.input, clip_frames, &opts, d, t, &halt) {
                            Ok(tr) => Some(tr.crops()),
                            Err(e) => {
                                if tx.send(Msg::Done(i, Err(e))).is_err() {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                let r = read_clips(
                    &it.input,
                    clip_frames,
                    size,
                    &opts,
                    track.as_deref(),
                    &halt,
                    &mut |c| {
                        let _ = tx.send(Msg::Clip(i, c));
                    },
                );
                if tx.send(Msg::Done(i, r)).is_err() {
                    break;
                }
            }
        });

        let mut out = Outcome::default();
        let mut rows: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
        let mut done: BTreeMap<usize, ClipStats> = BTreeMap::new();
        let mut batch: Vec<(usize, ClipData)> = Vec::new();
        let mut row_shape = Vec::new();
        let mut resized_note = false;
        let started = Instant::now();
        let bs = self.opts.batch_size.max(1);

        let flush = |batch: &mut Vec<(usize, ClipData)>,
                     rows: &mut BTreeMap<usize, Vec<Vec<f32>>>,
                     row_shape: &mut Vec<usize>| {
            if batch.is_empty() {
                return;
            }
            let (ids, clips): (Vec<usize>, Vec<ClipData>) = batch.drain(..).unzip();
            let (r, s) = model.extract_clips(&clips, self.opts.keep_seq);
            *row_shape = s;
            for (i, row) in ids.into_iter().zip(r) {
                rows.entry(i).or_default().push(row);
            }
        };

        let finish = |i: usize,
                      stats: &ClipStats,
                      rows: Vec<Vec<f32>>,
                      row_shape: &[usize],
                      out: &mut Outcome| {
            let it = &items[i];
            if rows.is_empty() {
                out.failures.push((
                    it.input.path().display().to_string(),
                    format!(
                        "{}: no complete clip ({} of {} frames decoded)",
                        it.input.path().display(),
                        stats.decoded,
                        stats.frames
                    ),
                ));
                return;
            }
            if stats.decoded < stats.frames && stats.clips < stats.clips_planned {
                out.notes.push(format!(
                    "{}: decoded {} of {} frames (truncated?); {} of {} clips",
                    it.input.path().display(),
                    stats.decoded,
                    stats.frames,
                    stats.clips,
                    stats.clips_planned
                ));
            }
            out.clips += rows.len();
            let arr = assemble(rows, row_shape, self.opts.reduction);
            let mut buf = Vec::new();
            let r = ndarray_npy::WriteNpyExt::write_npy(&arr, &mut buf)
                .map_err(|e| e.to_string())
                .and_then(|_| write_atomic(&it.out, &buf).map_err(|e| e.to_string()));
            match r {
                Ok(()) => out.written += 1,
                Err(e) => out.failures.push((
                    it.input.path().display().to_string(),
                    format!("{}: cannot write: {e}", it.out.display()),
                )),
            }
        };

        let complete = |done: &mut BTreeMap<usize, ClipStats>,
                        rows: &mut BTreeMap<usize, Vec<Vec<f32>>>,
                        batch: &[(usize, ClipData)],
                        row_shape: &[usize],
                        out: &mut Outcome| {
            let ready: Vec<usize> = done
                .keys()
                .copied()
                .filter(|i| !batch.iter().any(|(b, _)| b == i))
                .collect();
            for i in ready {
                let stats = done.remove(&i).unwrap_or_default();
                finish(
                    i,
                    &stats,
                    rows.remove(&i).unwrap_or_default(),
                    row_shape,
                    out,
                );
                bar.inc(1);
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "{} clips, {:.2} clips/s",
                    out.clips,
                    out.clips as f64 / secs
                ));
            }
        };

        for msg in rx.iter() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            match msg {
                Msg::Clip(i, c) => {
                    batch.push((i, c));
                    if batch.len() >= bs {
                        flush(&mut batch, &mut rows, &mut row_shape);
                        complete(&mut done, &mut rows, &batch, &row_shape, &mut out);
                    }
                }
                Msg::Done(i, Ok(stats)) => {
                    let (w, h) = stats.source_size;
                    if !resized_note && self.face.is_none() && (w, h) != (size, size) {
                        resized_note = true;
                        if !self.quiet {
                            bar.suspend(|| {
                                eprintln!(
                                    "note: {} has {w}x{h} frames; frames are resized to {size}x{size} (bilinear). \
                                     For faces in the wild, crop faces first.",
                                    items[i].input.path().display()
                                )
                            });
                        }
                    }
                    done.insert(i, stats);
                    complete(&mut done, &mut rows, &batch, &row_shape, &mut out);
                }
                Msg::Done(i, Err(e)) => {
                    batch.retain(|(b, _)| *b != i);
                    rows.remove(&i);
                    out.failures
                        .push((items[i].input.path().display().to_string(), e.to_string()));
                    bar.inc(1);
                }
            }
        }
        if !self.stop.load(Ordering::Relaxed) {
            flush(&mut batch, &mut rows, &mut row_shape);
            complete(&mut done, &mut rows, &batch, &row_shape, &mut out);
        }
        drop(rx);
        let _ = decoder.join();
        bar.finish_and_clear();
        Ok(out)
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
    if args.sample_rate == 0 || args.stride == 0 || args.batch_size == 0 {
        return Err("--sample-rate, --stride and --batch-size must be at least 1".into());
    }
    args.face.check()?;
    let mut failures = Vec::new();
    let all = discover(
        &args.inputs,
        args.list.as_deref(),
        &args.glob,
        &args.out,
        &npy_name,
        &mut failures,
    )?;
    let total = all.len();
    let (items, skipped): (Vec<Item>, Vec<Item>) = all
        .into_iter()
        .partition(|it| args.overwrite || !it.out.exists());
    if items.iter().any(|it| matches!(it.input, Input::Video(_))) {
        check_ffmpeg()?;
    }
    let mut outcome = Outcome::default();
    let stop = Arc::new(AtomicBool::new(false));
    if !items.is_empty() {
        let (cfg, weights) = args.model.resolve(false, !args.quiet)?;
        super::stop_on_ctrlc(&stop);
        let job = Job {
            cfg,
            weights,
            items,
            opts: ExtractOptions {
                sample_rate: args.sample_rate,
                stride: args.stride,
                keep_seq: args.keep_seq,
                reduction: args.reduction,
                batch_size: args.batch_size,
            },
            quiet: args.quiet,
            stop: stop.clone(),
            face: args.crop_face.then(|| args.face.clone()),
        };
        outcome = run_on(args.model.device, job)??;
    }
    failures.extend(std::mem::take(&mut outcome.failures));
    for n in &outcome.notes {
        eprintln!("note: {n}");
    }
    report(
        &args.out,
        &failures,
        outcome.written,
        total,
        skipped.len(),
        stop.load(Ordering::Relaxed),
        args.quiet,
    )
}

/// End of a batch job: `failures.json` in `out` (removed when all went well), one line per
/// failure, a summary, and the exit code (0, 1 with failures, 130 when interrupted).
pub(super) fn report(
    out: &Path,
    failures: &[(String, String)],
    written: usize,
    total: usize,
    skipped: usize,
    interrupted: bool,
    quiet: bool,
) -> Result<i32, String> {
    let report = out.join("failures.json");
    if failures.is_empty() {
        let _ = std::fs::remove_file(&report);
    } else {
        let json: Vec<serde_json::Value> = failures
            .iter()
            .map(|(f, e)| serde_json::json!({"file": f, "error": e}))
            .collect();
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        write_atomic(&report, text.as_bytes()).map_err(|e| format!("{}: {e}", report.display()))?;
        for (_, e) in failures {
            eprintln!("failed: {e}");
        }
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
