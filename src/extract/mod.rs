//! Video -> clips -> features, as marlin-pytorch's `extract_video`, streaming: frames are decoded
//! once, in order, and only the frames of pending windows are held in memory.

pub mod batch;
pub mod inputs;
pub mod manifest;
pub mod shard;

use crate::device_error::DeviceError;
use crate::face::{self, crop, crop::CropBox, track::Track, track::TrackOptions, Detector};
use crate::model::Marlin;
pub use crate::video::clip::{to_clip, ClipData};
pub use crate::video::{open_input, Input};
use crate::video::{windows, Frame, VideoError};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use ndarray::{ArrayD, Axis, IxDyn};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Why extraction of an input, or a whole job, failed. Each message is one line naming the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Video(#[from] VideoError),
    #[error("{path}: no complete clip ({decoded} of {frames} frames decoded)")]
    NoClip {
        path: String,
        decoded: usize,
        frames: usize,
    },
    #[error("{path}: cannot write: {msg}")]
    Write { path: String, msg: String },
    #[error(transparent)]
    Weights(#[from] crate::model::weights::WeightsError),
    /// The device failed (out of memory at this batch size, no kernel compiler).
    #[error(transparent)]
    Device(#[from] crate::device_error::DeviceError),
    /// Settings that cannot work (a zero stride, a bad pattern, an unreadable list file).
    #[error("{0}")]
    Options(String),
    /// The caller asked to stop (Ctrl-C) before the input was finished.
    #[error("{0}: interrupted")]
    Interrupted(String),
}

/// How per-clip features are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// One row per clip: `[n_clips, D]` (`[n_clips, N, D]` with keep_seq).
    #[default]
    None,
    /// Mean over clips: `[D]` (`[N, D]`).
    Mean,
    /// Max over clips: `[D]` (`[N, D]`).
    Max,
}

/// Options of [`Marlin::extract_video`], the reference's arguments and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractOptions {
    /// Keep every sample_rate-th frame (reference default 2).
    pub sample_rate: usize,
    /// Window step in kept frames (reference default 16).
    pub stride: usize,
    /// Token features `[N, D]` per clip instead of the pooled `[D]`.
    pub keep_seq: bool,
    pub reduction: Reduction,
    /// Clips per forward pass.
    pub batch_size: usize,
    /// Threads that decode (and detect faces) ahead of the model in batch runs
    /// ([`batch::extract_many`]), each taking the next input. One keeps a CPU model's cores to
    /// itself; a GPU wants several.
    pub decoders: usize,
}

impl ExtractOptions {
    /// Rates, strides and batch sizes of zero cannot work.
    pub fn check(&self) -> Result<(), ExtractError> {
        if self.sample_rate == 0 || self.stride == 0 || self.batch_size == 0 || self.decoders == 0 {
            return Err(ExtractError::Options(
                "--sample-rate, --stride, --batch-size and --decoders must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for Reduction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "mean" => Ok(Self::Mean),
            "max" => Ok(Self::Max),
            _ => Err(format!(
                "unknown reduction '{s}' (expected none, mean or max)"
            )),
        }
    }
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            sample_rate: 2,
            stride: 16,
            keep_seq: false,
            reduction: Reduction::None,
            batch_size: 4,
            decoders: 1,
        }
    }
}

/// What reading an input's clips found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipStats {
    /// Frame count from the container (or images in the folder).
    pub frames: usize,
    pub clips_planned: usize,
    pub clips: usize,
    /// Source frame size (before resizing).
    pub source_size: (usize, usize),
    /// Frames actually decoded (fewer than `frames` for a truncated file).
    pub decoded: usize,
}

/// Which source frames the windows of a `frames`-frame input use.
pub fn needed_frames(frames: usize, clip_frames: usize, opts: &ExtractOptions) -> Vec<bool> {
    let plan = windows::plan(frames, clip_frames, opts.sample_rate, opts.stride);
    let last = plan.iter().filter_map(|w| w.frames.last()).max().copied();
    let mut needed = vec![false; last.map_or(0, |l| l + 1)];
    for w in &plan {
        for &f in &w.frames {
            needed[f] = true;
        }
    }
    needed
}

/// Detect and track the face over the frames the windows of `input` use (frames decoded at
/// their own size), for [`read_clips`]' `crops`. A video without any face is an error.
pub fn face_track<B: Backend>(
    input: &Input,
    clip_frames: usize,
    opts: &ExtractOptions,
    detector: &Detector<B>,
    track: &TrackOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Track, VideoError> {
    let (mut reader, frames, _) = open_input(input, None)?;
    let needed = needed_frames(frames, clip_frames, opts);
    let det = face::track::detect_frames(reader.as_mut(), &needed, detector, track, stop)?;
    face::track::plan_track(&det, &needed, track).map_err(|msg| VideoError::Other {
        path: input.path().display().to_string(),
        msg: msg.to_string(),
    })
}

/// Read the clips of `input`, calling `emit` for each in order. Frames are resized to `size` x
/// `size`, or, with `crops` (a crop per frame index, from [`face_track`]), cut out of the
/// full frame and resized. `stop` is polled between frames (Ctrl-C).
pub fn read_clips(
    input: &Input,
    clip_frames: usize,
    size: usize,
    opts: &ExtractOptions,
    crops: Option<&[Option<CropBox>]>,
    stop: &dyn Fn() -> bool,
    emit: &mut dyn FnMut(ClipData),
) -> Result<ClipStats, VideoError> {
    let target = if crops.is_some() {
        None
    } else {
        Some((size, size))
    };
    let (mut reader, frames, source_size) = open_input(input, target)?;
    let plan = windows::plan(frames, clip_frames, opts.sample_rate, opts.stride);
    let mut stats = ClipStats {
        frames,
        clips_planned: plan.len(),
        source_size,
        ..Default::default()
    };
    let mut held: BTreeMap<usize, Arc<Frame>> = BTreeMap::new();
    let mut next_window = 0;
    let mut last_frame: Option<Arc<Frame>> = None;
    // Which source frames any window uses, computed once (not searched per frame).
    let needed = needed_frames(frames, clip_frames, opts);
    let mut ended = false;
    for (i, &is_needed) in needed.iter().enumerate() {
        if next_window >= plan.len() || stop() {
            break;
        }
        if is_needed {
            match reader.next_frame()? {
                Some(f) => {
                    let f = match crops {
                        Some(c) => match c.get(i).copied().flatten() {
                            Some(bx) => crop::crop_resize(&f, &bx, size),
                            None => {
                                return Err(VideoError::Other {
                                    path: input.path().display().to_string(),
                                    msg: format!("no face crop for frame {i}"),
                                })
                            }
                        },
                        None => f,
                    };
                    let f = Arc::new(f);
                    held.insert(i, f.clone());
                    last_frame = Some(f);
                }
                None => {
                    ended = true;
                    break;
                }
            }
        } else if !reader.skip_frame()? {
            ended = true;
            break;
        }
        stats.decoded = i + 1;
        while next_window < plan.len() && *plan[next_window].frames.last().unwrap_or(&0) == i {
            let w = &plan[next_window];
            let frames: Vec<Arc<Frame>> = w.frames.iter().map(|f| held[f].clone()).collect();
            emit(to_clip(&frames));
            stats.clips += 1;
            next_window += 1;
            let keep_from = plan
                .get(next_window)
                .map(|w| w.frames[0])
                .unwrap_or(usize::MAX);
            held.retain(|&k, _| k >= keep_from);
        }
    }
    if ended {
        // The stream ended before the container's frame count: pad short-video windows with the
        // last decoded frame; sliding windows that cannot complete are dropped (as the reference).
        for w in &plan[next_window..] {
            if !w.pad_short || stop() {
                continue;
            }
            let Some(last) = &last_frame else { break };
            let frames: Vec<Arc<Frame>> = w
                .frames
                .iter()
                .map(|f| held.get(f).cloned().unwrap_or_else(|| last.clone()))
                .collect();
            emit(to_clip(&frames));
            stats.clips += 1;
        }
    }
    if stats.decoded == 0 || last_frame.is_none() {
        return Err(VideoError::Other {
            path: input.path().display().to_string(),
            msg: "no frame could be decoded".into(),
        });
    }
    Ok(stats)
}

/// The features of [`Marlin::submit_clips`] read back: one row per clip, `[D]` or `[N, D]`
/// (keep_seq), and that row shape.
pub fn feature_rows<B: Backend>(f: Tensor<B, 3>, keep_seq: bool) -> (Vec<Vec<f32>>, Vec<usize>) {
    let [_, n, d] = f.dims();
    let data = crate::model::load::to_f32_vec(f);
    let rows = data.chunks(n * d).map(<[f32]>::to_vec).collect();
    (rows, if keep_seq { vec![n, d] } else { vec![d] })
}

/// Per-clip feature rows -> the output array: `[n_clips, D]` / `[n_clips, N, D]`, or reduced
/// over clips to `[D]` / `[N, D]`.
pub fn assemble(rows: Vec<Vec<f32>>, row_shape: &[usize], reduction: Reduction) -> ArrayD<f32> {
    let n = rows.len();
    let mut shape = vec![n];
    shape.extend_from_slice(row_shape);
    let flat: Vec<f32> = rows.into_iter().flatten().collect();
    // The rows were produced with row_shape, so the sizes agree.
    let a = ArrayD::from_shape_vec(IxDyn(&shape), flat).expect("feature rows fit their shape");
    match reduction {
        Reduction::None => a,
        Reduction::Mean => a.mean_axis(Axis(0)).unwrap_or(a),
        Reduction::Max => a.fold_axis(Axis(0), f32::NEG_INFINITY, |m, &v| m.max(v)),
    }
}

/// A batch's features on their way: a tensor on burn's device, or a batch an engine is
/// computing ([`crate::engine::FeatureEngine`]).
pub enum Submitted<B: Backend> {
    Tensor(Tensor<B, 3>),
    Engine(
        Arc<dyn crate::engine::FeatureEngine>,
        crate::engine::Pending,
    ),
}

impl<B: Backend> Submitted<B> {
    /// The features read back: one row per clip, `[D]` or `[N, D]` (keep_seq), and that row
    /// shape. Waits for the device.
    pub fn rows(self, keep_seq: bool) -> Result<(Vec<Vec<f32>>, Vec<usize>), DeviceError> {
        match self {
            Submitted::Tensor(f) => Ok(feature_rows(f, keep_seq)),
            Submitted::Engine(e, p) => {
                let [_, n, d] = p.shape;
                let v = e.wait(p)?;
                let rows = v.chunks(n * d).map(<[f32]>::to_vec).collect();
                Ok((rows, if keep_seq { vec![n, d] } else { vec![d] }))
            }
        }
    }
}

impl<B: Backend> Marlin<B> {
    /// Features of a batch of clips: one row per clip, `[D]` or `[N, D]` (keep_seq).
    pub fn extract_clips(&self, clips: &[ClipData], keep_seq: bool) -> (Vec<Vec<f32>>, Vec<usize>) {
        match self
            .submit_clips(clips, keep_seq)
            .and_then(|s| s.rows(keep_seq))
        {
            Ok(r) => r,
            // An engine's failure, as burn's are: a panic the device guard turns into a value.
            Err(e) => panic!("{e}"),
        }
    }

    /// Start the features of a batch of clips without waiting for them: a GPU computes while
    /// the caller prepares the next batch and reads this one with [`Submitted::rows`]. With an
    /// engine attached, its failures come back as values; burn's panic (see
    /// [`crate::device_error::guard`]).
    pub fn submit_clips(
        &self,
        clips: &[ClipData],
        keep_seq: bool,
    ) -> Result<Submitted<B>, DeviceError> {
        if let Some(e) = &self.engine {
            let slices: Vec<&[f32]> = clips.iter().map(|c| c.data.as_slice()).collect();
            let p = e.submit(&slices, keep_seq)?;
            return Ok(Submitted::Engine(e.clone(), p));
        }
        let c = &self.config;
        let (t, s) = (c.clip_frames, c.img_size);
        let b = clips.len();
        let mut flat = Vec::with_capacity(b * 3 * t * s * s);
        for clip in clips {
            flat.extend_from_slice(&clip.data);
        }
        let device = self.encoder.norm.gamma.device();
        let x = Tensor::<B, 5>::from_data(TensorData::new(flat, [b, 3, t, s, s]), &device);
        Ok(Submitted::Tensor(self.extract_features(x, keep_seq)))
    }

    /// [`Marlin::extract_clips`] with the device's failures (out of memory, no kernel
    /// compiler) as an error instead of a panic.
    pub fn try_extract_clips(
        &self,
        clips: &[ClipData],
        keep_seq: bool,
    ) -> Result<(Vec<Vec<f32>>, Vec<usize>), DeviceError> {
        crate::device_error::guard(clips.len(), || {
            self.submit_clips(clips, keep_seq)
                .and_then(|s| s.rows(keep_seq))
        })
        .and_then(|r| r)
    }

    /// Features of one video file or frame folder, as marlin-pytorch's `extract_video`:
    /// `[n_clips, D]` (`[n_clips, N, D]` with keep_seq), or reduced over clips.
    pub fn extract_video(
        &self,
        path: &Path,
        opts: &ExtractOptions,
    ) -> Result<(ArrayD<f32>, ClipStats), ExtractError> {
        self.extract_video_faces(path, opts, None)
    }

    /// [`Marlin::extract_video`]; with `faces`, the face is detected and tracked first and
    /// the clips are cut from its crops (the peer's `crop_face=True`, with the built-in
    /// detector).
    pub fn extract_video_faces(
        &self,
        path: &Path,
        opts: &ExtractOptions,
        faces: Option<&batch::FaceCrop<B>>,
    ) -> Result<(ArrayD<f32>, ClipStats), ExtractError> {
        self.extract_video_until(path, opts, faces, &|| false)
    }

    /// [`Marlin::extract_video_faces`] that ends early with [`ExtractError::Interrupted`] once
    /// `stop` returns true (polled between frames), for callers that take Ctrl-C.
    pub fn extract_video_until(
        &self,
        path: &Path,
        opts: &ExtractOptions,
        faces: Option<&batch::FaceCrop<B>>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(ArrayD<f32>, ClipStats), ExtractError> {
        opts.check()?;
        let input = Input::from_path(path);
        let (t, size) = (self.config.clip_frames, self.config.img_size);
        let crops = match faces {
            Some(f) => Some(face_track(&input, t, opts, &f.detector, &f.track, stop)?.crops()),
            None => None,
        };
        let mut pending = Vec::new();
        let mut rows = Vec::new();
        let mut row_shape = vec![];
        let bs = opts.batch_size.max(1);
        let mut failed = None;
        let stats = read_clips(&input, t, size, opts, crops.as_deref(), stop, &mut |clip| {
            pending.push(clip);
            if pending.len() == bs && failed.is_none() {
                match self.try_extract_clips(&pending, opts.keep_seq) {
                    Ok((r, s)) => {
                        rows.extend(r);
                        row_shape = s;
                    }
                    Err(e) => failed = Some(e),
                }
                pending.clear();
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        if !pending.is_empty() {
            let (r, s) = self.try_extract_clips(&pending, opts.keep_seq)?;
            rows.extend(r);
            row_shape = s;
        }
        if stop() {
            return Err(ExtractError::Interrupted(path.display().to_string()));
        }
        if rows.is_empty() {
            return Err(ExtractError::NoClip {
                path: path.display().to_string(),
                decoded: stats.decoded,
                frames: stats.frames,
            });
        }
        Ok((assemble(rows, &row_shape, opts.reduction), stats))
    }
}
