//! Many inputs -> features, streaming: one thread decodes (and detects faces), the model takes
//! batches of clips across inputs, each input's features go to a [`Sink`] as soon as its last
//! clip is through. Failures are values: an input that cannot be read, has no complete clip or
//! cannot be written is recorded and the run goes on.
//!
//! ```no_run
//! use marlin::backend::Cpu;
//! use marlin::extract::batch::{extract_to_npy, BatchOptions};
//! use marlin::extract::inputs::{discover, DiscoverOptions};
//! use marlin::{Marlin, MarlinConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = MarlinConfig::from_name("marlin_vit_base_ytf")?;
//! let weights = std::path::Path::new("marlin_vit_base_ytf.encoder.pt");
//! let (model, _) = Marlin::<Cpu>::load_file(&cfg, weights, &[], &Default::default())?;
//! let found = discover(&["videos/".into()], &DiscoverOptions::new("features/"))?;
//! let summary = extract_to_npy(&model, &found.items, &BatchOptions::default(), None,
//!     &Default::default(), &mut |p| eprintln!("{}/{} inputs", p.done, p.total))?;
//! println!("{} written, {} failed", summary.written, summary.failures.len());
//! # Ok(()) }
//! ```

pub use super::inputs::Failure;
use super::inputs::Item;
use super::{
    assemble, face_track, read_clips, ClipData, ClipStats, ExtractError, ExtractOptions, Submitted,
};
use crate::device_error::DeviceError;
use crate::face::{Detector, TrackOptions};
use crate::model::Marlin;
use crate::video::Input;
use burn::tensor::backend::Backend;
use ndarray::ArrayD;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Settings of a batch run: the reference's windowing and batching, and whether existing
/// outputs are recomputed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchOptions {
    pub extract: ExtractOptions,
    /// Recompute outputs that already exist (else they are skipped: a rerun resumes).
    pub overwrite: bool,
}

/// Faces in the wild: the detector (on the model's device) and how one face is followed.
pub struct FaceCrop<B: Backend> {
    pub detector: Detector<B>,
    pub track: TrackOptions,
}

/// Where a run stands, after each finished input.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Inputs finished (written or failed) of `total`.
    pub done: usize,
    pub total: usize,
    /// Clips through the model so far.
    pub clips: usize,
    pub elapsed: Duration,
}

impl Progress {
    pub fn clips_per_second(&self) -> f64 {
        self.clips as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One input's features: `[clips, D]` (`[clips, N, D]` with keep_seq) or reduced over clips.
#[derive(Debug, Clone)]
pub struct Features {
    pub array: ArrayD<f32>,
    pub stats: ClipStats,
}

/// What receives a run's results, in the order inputs finish.
pub trait Sink {
    /// The features of `items[index]`. An error makes that input a failure.
    fn features(&mut self, index: usize, features: Features) -> Result<(), ExtractError>;
    /// Advice worth telling once (frames are being resized).
    fn note(&mut self, _message: &str) {}
    /// Something about the data the user must know (a truncated file gave fewer clips).
    fn warning(&mut self, _message: &str) {}
    /// After each finished input.
    fn progress(&mut self, _p: &Progress) {}
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Inputs whose features reached the sink.
    pub written: usize,
    pub clips: usize,
    pub failures: Vec<Failure>,
    /// The run stopped early (`stop` was set); finished outputs are whole.
    pub interrupted: bool,
    /// The device failed (out of memory at this batch size, no kernel compiler) and the run
    /// stopped; finished outputs are whole and a rerun resumes after them.
    pub device_error: Option<DeviceError>,
}

/// Decoders -> model thread.
enum Msg {
    Clip(usize, ClipData),
    Done(usize, Result<ClipStats, ExtractError>),
}

/// Model thread -> the caller's thread (which assembles, writes and reports).
enum Out {
    /// Every clip of input `i` is through the model.
    Finished(usize, ClipStats, Vec<Vec<f32>>, Vec<usize>),
    Failed(usize, ExtractError),
    Note(String),
    /// The device failed; no later batch would fare better.
    Fatal(DeviceError),
}

/// Extract the features of `inputs` with `model`, batching clips across inputs
/// (`batch_size`). `decoders` threads decode (and detect faces, with `faces`) ahead of the
/// model, each taking the next input; the model runs in its own thread; the sink (assembling
/// and writing outputs, progress) runs in the caller's thread, off the model's path. `stop` is
/// polled between frames and batches: once set, the run ends after the current batch and
/// reports `interrupted`. A device failure (out of memory at this batch size) ends the run
/// with [`Summary::device_error`]; the outputs finished before it are whole.
pub fn extract_many<B: Backend>(
    model: &Marlin<B>,
    inputs: &[Input],
    opts: &ExtractOptions,
    faces: Option<&FaceCrop<B>>,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
) -> Summary {
    let (clip_frames, size) = (model.config.clip_frames, model.config.img_size);
    let bs = opts.batch_size.max(1);
    let (tx, rx) = mpsc::sync_channel::<Msg>(2 * bs);
    let (out_tx, out_rx) = mpsc::channel::<Out>();
    // Set on a device failure: decoders stop as on Ctrl-C, but the run is not "interrupted".
    let failed = AtomicBool::new(false);
    let halt = || stop.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
    let next_input = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let mut out = Summary::default();
    std::thread::scope(|scope| {
        for _ in 0..opts.decoders.max(1) {
            let tx = tx.clone();
            let (halt, next_input) = (&halt, &next_input);
            scope.spawn(move || loop {
                let i = next_input.fetch_add(1, Ordering::Relaxed);
                let Some(input) = inputs.get(i) else { break };
                if halt() {
                    break;
                }
                let crops = match faces {
                    Some(f) => {
                        match face_track(input, clip_frames, opts, &f.detector, &f.track, halt) {
                            Ok(t) => Some(t.crops()),
                            Err(e) => {
                                if tx.send(Msg::Done(i, Err(e.into()))).is_err() {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                let r = read_clips(
                    input,
                    clip_frames,
                    size,
                    opts,
                    crops.as_deref(),
                    halt,
                    &mut |c| {
                        let _ = tx.send(Msg::Clip(i, c));
                    },
                );
                if tx.send(Msg::Done(i, r.map_err(Into::into))).is_err() {
                    break;
                }
            });
        }
        // The decoders hold the only senders: the model thread's loop ends when they are done.
        drop(tx);

        let halt_ref = &halt;
        scope.spawn(move || {
            model_loop(
                model,
                opts,
                faces.is_some(),
                size,
                inputs,
                rx,
                &out_tx,
                halt_ref,
            );
        });

        for msg in out_rx.iter() {
            match msg {
                Out::Finished(i, stats, rows, row_shape) => {
                    match finish(&inputs[i], stats, rows, &row_shape, opts) {
                        Ok((features, warning)) => {
                            if let Some(w) = warning {
                                sink.warning(&w);
                            }
                            let clips = features.stats.clips;
                            match sink.features(i, features) {
                                Ok(()) => {
                                    out.written += 1;
                                    out.clips += clips;
                                }
                                Err(e) => out.failures.push(Failure::new(&inputs[i], e)),
                            }
                        }
                        Err(e) => out.failures.push(Failure::new(&inputs[i], e)),
                    }
                }
                Out::Failed(i, e) => out.failures.push(Failure::new(&inputs[i], e)),
                Out::Note(n) => {
                    sink.note(&n);
                    continue;
                }
                Out::Fatal(e) => {
                    failed.store(true, Ordering::Relaxed);
                    out.device_error = Some(e);
                    continue;
                }
            }
            sink.progress(&Progress {
                done: out.written + out.failures.len(),
                total: inputs.len(),
                clips: out.clips,
                elapsed: started.elapsed(),
            });
        }
    });
    out.interrupted = stop.load(Ordering::Relaxed);
    out
}

/// The model thread of [`extract_many`]: batches clips across inputs, runs the model, and
/// hands each input on once its decoding is done and none of its clips wait in the batch.
#[allow(clippy::too_many_arguments)]
fn model_loop<B: Backend>(
    model: &Marlin<B>,
    opts: &ExtractOptions,
    cropping: bool,
    size: usize,
    inputs: &[Input],
    rx: mpsc::Receiver<Msg>,
    out: &mpsc::Sender<Out>,
    halt: &dyn Fn() -> bool,
) {
    let bs = opts.batch_size.max(1);
    let mut rows: BTreeMap<usize, Vec<Vec<f32>>> = BTreeMap::new();
    let mut done: BTreeMap<usize, ClipStats> = BTreeMap::new();
    let mut batch: Vec<(usize, ClipData)> = Vec::new();
    let mut row_shape = Vec::new();
    let mut resized_note = false;
    // The batch the device is computing: submitted, not yet read back. A batch is read only
    // after the next one is submitted, so a GPU never waits for the host between batches.
    let mut in_flight: Option<(Vec<usize>, Submitted<B>)> = None;

    // Read back the batch in flight; false when the device failed (reported, the run ends).
    let read = |in_flight: &mut Option<(Vec<usize>, Submitted<B>)>,
                rows: &mut BTreeMap<usize, Vec<Vec<f32>>>,
                row_shape: &mut Vec<usize>|
     -> bool {
        let Some((ids, f)) = in_flight.take() else {
            return true;
        };
        let n = ids.len();
        match crate::device_error::guard(n, || f.rows(opts.keep_seq)).and_then(|r| r) {
            Ok((r, s)) => {
                *row_shape = s;
                for (i, row) in ids.into_iter().zip(r) {
                    rows.entry(i).or_default().push(row);
                }
                true
            }
            Err(e) => {
                let _ = out.send(Out::Fatal(e));
                false
            }
        }
    };

    // Submit the batch and read the previous one; false when the device failed.
    let flush = |batch: &mut Vec<(usize, ClipData)>,
                 in_flight: &mut Option<(Vec<usize>, Submitted<B>)>,
                 rows: &mut BTreeMap<usize, Vec<Vec<f32>>>,
                 row_shape: &mut Vec<usize>|
     -> bool {
        if batch.is_empty() {
            return read(in_flight, rows, row_shape);
        }
        let (ids, clips): (Vec<usize>, Vec<ClipData>) = batch.drain(..).unzip();
        match crate::device_error::guard(clips.len(), || model.submit_clips(&clips, opts.keep_seq))
            .and_then(|r| r)
        {
            // Read the batch this one replaces on the device.
            Ok(f) => read(&mut in_flight.replace((ids, f)), rows, row_shape),
            Err(e) => {
                let _ = out.send(Out::Fatal(e));
                false
            }
        }
    };

    // Inputs whose decoding is done and none of whose clips wait in the batch or on the
    // device go out.
    let complete = |done: &mut BTreeMap<usize, ClipStats>,
                    rows: &mut BTreeMap<usize, Vec<Vec<f32>>>,
                    batch: &[(usize, ClipData)],
                    in_flight: &Option<(Vec<usize>, Submitted<B>)>,
                    row_shape: &[usize]| {
        let waiting = |i: &usize| {
            batch.iter().any(|(b, _)| b == i)
                || in_flight.as_ref().is_some_and(|(ids, _)| ids.contains(i))
        };
        let ready: Vec<usize> = done.keys().copied().filter(|i| !waiting(i)).collect();
        for i in ready {
            let stats = done.remove(&i).unwrap_or_default();
            let r = rows.remove(&i).unwrap_or_default();
            let _ = out.send(Out::Finished(i, stats, r, row_shape.to_vec()));
        }
    };

    for msg in rx.iter() {
        if halt() {
            break;
        }
        match msg {
            Msg::Clip(i, c) => {
                batch.push((i, c));
                if batch.len() >= bs {
                    if !flush(&mut batch, &mut in_flight, &mut rows, &mut row_shape) {
                        return;
                    }
                    complete(&mut done, &mut rows, &batch, &in_flight, &row_shape);
                }
            }
            Msg::Done(i, Ok(stats)) => {
                let (w, h) = stats.source_size;
                if !resized_note && !cropping && (w, h) != (size, size) {
                    resized_note = true;
                    let _ = out.send(Out::Note(format!(
                        "{} has {w}x{h} frames; frames are resized to {size}x{size} (bilinear). \
                         For faces in the wild, crop faces first.",
                        inputs[i].path().display()
                    )));
                }
                done.insert(i, stats);
                complete(&mut done, &mut rows, &batch, &in_flight, &row_shape);
            }
            Msg::Done(i, Err(e)) => {
                batch.retain(|(b, _)| *b != i);
                rows.remove(&i);
                let _ = out.send(Out::Failed(i, e));
            }
        }
    }
    if halt() {
        return;
    }
    // The last batch, then the one it leaves in flight.
    if flush(&mut batch, &mut in_flight, &mut rows, &mut row_shape)
        && read(&mut in_flight, &mut rows, &mut row_shape)
    {
        complete(&mut done, &mut rows, &batch, &in_flight, &row_shape);
    }
    // Dropping the receiver ends the decoders at their next send; the scope joins them.
}

/// One input's rows -> its features, or why there are none; with a warning for a truncated
/// file.
fn finish(
    input: &Input,
    stats: ClipStats,
    rows: Vec<Vec<f32>>,
    row_shape: &[usize],
    opts: &ExtractOptions,
) -> Result<(Features, Option<String>), ExtractError> {
    if rows.is_empty() {
        return Err(ExtractError::NoClip {
            path: input.path().display().to_string(),
            decoded: stats.decoded,
            frames: stats.frames,
        });
    }
    let note = (stats.decoded < stats.frames && stats.clips < stats.clips_planned).then(|| {
        format!(
            "{}: decoded {} of {} frames (truncated?); {} of {} clips",
            input.path().display(),
            stats.decoded,
            stats.frames,
            stats.clips,
            stats.clips_planned
        )
    });
    Ok((
        Features {
            array: assemble(rows, row_shape, opts.reduction),
            stats,
        },
        note,
    ))
}

/// A [`Sink`] that writes each input's features to its item's `.npy` path atomically (a temp
/// file renamed into place), forwarding notes and progress.
pub struct NpyWriter<'a> {
    outs: Vec<PathBuf>,
    on_progress: &'a mut dyn FnMut(&Progress),
    notes: Vec<String>,
    warnings: Vec<String>,
}

impl Sink for NpyWriter<'_> {
    fn features(&mut self, index: usize, f: Features) -> Result<(), ExtractError> {
        let out = &self.outs[index];
        crate::util::write_npy_atomic(out, &f.array).map_err(|e| ExtractError::Write {
            path: out.display().to_string(),
            msg: e.to_string(),
        })
    }
    fn note(&mut self, message: &str) {
        self.notes.push(message.to_string());
    }
    fn warning(&mut self, message: &str) {
        self.warnings.push(message.to_string());
    }
    fn progress(&mut self, p: &Progress) {
        (self.on_progress)(p)
    }
}

/// What [`extract_to_npy`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NpySummary {
    pub written: usize,
    /// Items whose output already existed (not recomputed without `overwrite`).
    pub skipped: usize,
    pub clips: usize,
    pub failures: Vec<Failure>,
    /// Advice for the user (frames resized).
    pub notes: Vec<String>,
    /// What the user must know about the data (truncated files).
    pub warnings: Vec<String>,
    pub interrupted: bool,
    /// The device failed and the run stopped ([`Summary::device_error`]).
    pub device_error: Option<DeviceError>,
}

/// [`extract_many`] into `.npy` files: items whose output exists are skipped unless
/// `overwrite` (so a killed run resumes), each output is written atomically, and failures are
/// returned (see [`write_failures`] for the reference's `failures.json`). `progress` counts the
/// items that run.
pub fn extract_to_npy<B: Backend>(
    model: &Marlin<B>,
    items: &[Item],
    opts: &BatchOptions,
    faces: Option<&FaceCrop<B>>,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<NpySummary, ExtractError> {
    opts.extract.check()?;
    let (todo, skipped): (Vec<&Item>, Vec<&Item>) = items
        .iter()
        .partition(|it| opts.overwrite || !it.out.exists());
    let inputs: Vec<Input> = todo.iter().map(|it| it.input.clone()).collect();
    let mut sink = NpyWriter {
        outs: todo.iter().map(|it| it.out.clone()).collect(),
        on_progress: progress,
        notes: Vec::new(),
        warnings: Vec::new(),
    };
    let s = extract_many(model, &inputs, &opts.extract, faces, stop, &mut sink);
    Ok(NpySummary {
        written: s.written,
        skipped: skipped.len(),
        clips: s.clips,
        failures: s.failures,
        notes: sink.notes,
        warnings: sink.warnings,
        interrupted: s.interrupted,
        device_error: s.device_error,
    })
}

/// [`extract_to_npy`] with several workers in one process: each is a model replica (on its own
/// device, or several on one) with its own batch queue and decoder thread, and takes every
/// n-th input. Outputs are the same files as with one worker; `progress` sees the sum.
pub fn extract_to_npy_workers<B: Backend>(
    workers: Vec<(Marlin<B>, Option<FaceCrop<B>>)>,
    items: &[Item],
    opts: &BatchOptions,
    stop: &AtomicBool,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<NpySummary, ExtractError> {
    opts.extract.check()?;
    let n = workers.len();
    if n == 0 {
        return Err(ExtractError::Options("no worker to run on".into()));
    }
    let groups: Vec<Vec<Item>> = (0..n)
        .map(|w| items.iter().skip(w).step_by(n).cloned().collect())
        .collect();
    let shared = std::sync::Mutex::new((vec![Progress::default(); n], progress));
    let results: Vec<Result<NpySummary, ExtractError>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .into_iter()
            .zip(&groups)
            .enumerate()
            .map(|(w, ((model, faces), group))| {
                let shared = &shared;
                s.spawn(move || {
                    let mut report = |p: &Progress| {
                        // A poisoned lock only loses a progress update.
                        if let Ok(mut l) = shared.lock() {
                            l.0[w] = p.clone();
                            let sum = l.0.iter().fold(Progress::default(), |a, p| Progress {
                                done: a.done + p.done,
                                total: a.total + p.total,
                                clips: a.clips + p.clips,
                                elapsed: a.elapsed.max(p.elapsed),
                            });
                            (l.1)(&sum);
                        }
                    };
                    extract_to_npy(&model, group, opts, faces.as_ref(), stop, &mut report)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ExtractError::Options("a worker panicked".into())))
            })
            .collect()
    });
    let mut all = NpySummary::default();
    for r in results {
        let r = r?;
        all.written += r.written;
        all.skipped += r.skipped;
        all.clips += r.clips;
        all.failures.extend(r.failures);
        all.interrupted |= r.interrupted;
        if all.device_error.is_none() {
            all.device_error = r.device_error;
        }
        for n in r.notes {
            if !all.notes.contains(&n) {
                all.notes.push(n);
            }
        }
        all.warnings.extend(r.warnings);
    }
    Ok(all)
}

/// The failures of a batch job as `dir/failures.json` (`[{"file", "error"}]`, written
/// atomically), or no such file when there were none. Returns its path when written.
pub fn write_failures(
    dir: &std::path::Path,
    failures: &[Failure],
) -> Result<Option<PathBuf>, ExtractError> {
    write_failures_as(dir, "failures.json", failures)
}

/// [`write_failures`] under another file name (a shard's `failures.shard-I-of-N.json`).
pub fn write_failures_as(
    dir: &std::path::Path,
    name: &str,
    failures: &[Failure],
) -> Result<Option<PathBuf>, ExtractError> {
    let path = dir.join(name);
    if failures.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    let write_err = |msg: String| ExtractError::Write {
        path: path.display().to_string(),
        msg,
    };
    let text = serde_json::to_string_pretty(failures).map_err(|e| write_err(e.to_string()))?;
    crate::util::write_atomic(&path, text.as_bytes()).map_err(|e| write_err(e.to_string()))?;
    Ok(Some(path))
}
