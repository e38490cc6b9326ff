//! A video (or frame folder) in the wild -> a face video (or frame folder) of the reference's
//! crops around one tracked face, plus the track as JSON for the pretraining preprocessing.
//! Outputs appear whole or not at all: a video is written under a temp name, a frame folder
//! as a temp folder, each renamed into place when complete.

use super::crop::crop_resize;
use super::track::{detect_frames, plan_track, Track, TrackOptions};
use super::Detector;
use crate::util::{temp_path, write_atomic};
use crate::video::writer::VideoWriter;
use crate::video::{self, open_input, Frame, Input, VideoError};
use burn::tensor::backend::Backend;
use std::path::Path;

/// Image type of frame folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// JPEG, quality 95 (the reference's YouTube Faces layout; ~5x smaller).
    #[default]
    Jpg,
    /// PNG, lossless.
    Png,
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpg => "jpg",
            ImageFormat::Png => "png",
        }
    }
}

/// What a crop writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropFormat {
    /// An H.264 video.
    Mp4,
    /// A folder of frames: the input's frame names for a frame folder, else `00000.jpg`, ...
    Frames(ImageFormat),
}

/// Settings of [`crop_video`].
#[derive(Debug, Clone, PartialEq)]
pub struct CropVideoOptions {
    /// Side of the square output frames.
    pub size: usize,
    pub format: CropFormat,
    /// How the face is followed.
    pub track: TrackOptions,
}

impl Default for CropVideoOptions {
    fn default() -> Self {
        Self {
            size: 224,
            format: CropFormat::Mp4,
            track: TrackOptions::default(),
        }
    }
}

/// Why a video could not be cropped. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CropError {
    #[error(transparent)]
    Video(#[from] VideoError),
    /// No face in any examined frame, and the like.
    #[error("{path}: {msg}")]
    Track { path: String, msg: String },
    #[error("{path}: {msg}")]
    Write { path: String, msg: String },
    /// Ctrl-C (or the caller's stop) ended the work before it finished.
    #[error("interrupted")]
    Interrupted,
}

/// What a finished crop found.
#[derive(Debug, Clone)]
pub struct Cropped {
    pub track: Track,
    pub fps: f64,
    /// The input's frame size.
    pub source_size: (usize, usize),
}

/// Encode a frame as JPEG (quality 95) or PNG.
pub fn encode_image(f: &Frame, format: ImageFormat) -> Result<Vec<u8>, image::ImageError> {
    use image::error::{ParameterError, ParameterErrorKind};
    let img = image::RgbImage::from_raw(f.width as u32, f.height as u32, f.data.clone())
        .ok_or_else(|| {
            image::ImageError::Parameter(ParameterError::from_kind(
                ParameterErrorKind::DimensionMismatch,
            ))
        })?;
    let mut buf = std::io::Cursor::new(Vec::new());
    match format {
        ImageFormat::Png => img.write_to(&mut buf, image::ImageFormat::Png),
        ImageFormat::Jpg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95).encode_image(&img)
        }
    }?;
    Ok(buf.into_inner())
}

/// Detect the face in every frame of `input`, follow one, and write its crops to `out` (a video
/// file or a folder, by `opts.format`). `Ok(None)` when `stop` was set before the end (nothing
/// is left under `out`).
pub fn crop_video<B: Backend>(
    input: &Input,
    out: &Path,
    detector: &Detector<B>,
    opts: &CropVideoOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Cropped>, CropError> {
    let path = input.path().display().to_string();
    let (mut reader, frames, source_size) = open_input(input, None)?;
    let fps = match input {
        Input::Video(v) => video::probe(v).map(|i| i.fps).unwrap_or(25.0),
        Input::Frames(_) => 25.0,
    };
    let wanted = vec![true; frames];
    let dets = detect_frames(reader.as_mut(), &wanted, detector, &opts.track, stop)?;
    drop(reader);
    if stop() {
        return Ok(None);
    }
    let track = plan_track(&dets, &wanted, &opts.track).map_err(|e| CropError::Track {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let crops = track.crops();
    let write_err = |p: &Path, msg: String| CropError::Write {
        path: p.display().to_string(),
        msg,
    };
    let (mut reader, _, _) = open_input(input, None)?;
    let tmp_dir = temp_path(out);
    let (mut writer, names) = match opts.format {
        CropFormat::Mp4 => (
            Some(VideoWriter::create(out, opts.size, opts.size, fps)?),
            Vec::new(),
        ),
        CropFormat::Frames(fmt) => {
            let ext = fmt.extension();
            let names: Vec<String> = match input {
                Input::Frames(d) => video::list_frames(d)?
                    .iter()
                    .map(|f| {
                        f.with_extension(ext)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    })
                    .collect(),
                Input::Video(_) => (0..crops.len()).map(|i| format!("{i:05}.{ext}")).collect(),
            };
            let _ = std::fs::remove_dir_all(&tmp_dir);
            std::fs::create_dir_all(&tmp_dir).map_err(|e| write_err(&tmp_dir, e.to_string()))?;
            (None, names)
        }
    };
    let result = (|| -> Result<bool, CropError> {
        for (i, c) in crops.iter().enumerate() {
            if stop() {
                return Ok(false);
            }
            let Some(f) = reader.next_frame()? else {
                break;
            };
            let Some(c) = c else { continue };
            let face = crop_resize(&f, c, opts.size);
            match (writer.as_mut(), opts.format) {
                (Some(w), _) => w.write(&face)?,
                (None, CropFormat::Frames(fmt)) => {
                    let p = tmp_dir.join(&names[i]);
                    // Plain writes: the folder is renamed into place when complete.
                    encode_image(&face, fmt)
                        .map_err(|e| e.to_string())
                        .and_then(|b| std::fs::write(&p, b).map_err(|e| e.to_string()))
                        .map_err(|e| write_err(&p, e))?;
                }
                (None, CropFormat::Mp4) => unreachable!("an Mp4 crop has a writer"),
            }
        }
        Ok(true)
    })();
    match result {
        Ok(true) => {}
        Ok(false) => {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return Ok(None);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp_dir);
            return if stop() { Ok(None) } else { Err(e) };
        }
    }
    match writer {
        Some(w) => w.finish()?,
        None => {
            let _ = std::fs::remove_dir_all(out);
            std::fs::rename(&tmp_dir, out).map_err(|e| write_err(out, e.to_string()))?;
        }
    }
    Ok(Some(Cropped {
        track,
        fps,
        source_size,
    }))
}

/// The track of a crop as JSON: per frame the detection (frame pixels), whether the detector
/// ran, the crop square and the landmarks in crop pixels.
pub fn track_json(input: &Path, opts: &CropVideoOptions, c: &Cropped) -> String {
    let frames: Vec<serde_json::Value> = c
        .track
        .frames
        .iter()
        .map(|f| {
            let lm = f.face.map(|face| {
                face.landmarks
                    .map(|p| f.crop.to_crop(p, opts.size))
                    .to_vec()
            });
            serde_json::json!({
                "index": f.index,
                "examined": f.examined,
                "face": f.face,
                "crop": f.crop,
                "landmarks_crop": lm,
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "input": input.display().to_string(),
        "width": c.source_size.0,
        "height": c.source_size.1,
        "fps": c.fps,
        "size": opts.size,
        "face_select": opts.track.select,
        "smooth": opts.track.smooth,
        "margin": opts.track.margin,
        "examined": c.track.examined,
        "detected": c.track.detected,
        "frames": frames,
    }))
    .unwrap_or_default()
}

/// [`crop_video`], then its track as `json` (written atomically).
pub fn crop_video_with_track<B: Backend>(
    input: &Input,
    out: &Path,
    json: &Path,
    detector: &Detector<B>,
    opts: &CropVideoOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Cropped>, CropError> {
    let Some(c) = crop_video(input, out, detector, opts, stop)? else {
        return Ok(None);
    };
    write_atomic(json, track_json(input.path(), opts, &c).as_bytes()).map_err(|e| {
        CropError::Write {
            path: json.display().to_string(),
            msg: e.to_string(),
        }
    })?;
    Ok(Some(c))
}
