//! What masked pretraining sees and predicts for one clip: every frame as original | masked |
//! reconstruction (the reference's sample image), as pictures and a video. Without a model
//! (or with an encoder-only one) only the mask is drawn.

use super::data::ClipSettings;
use super::samples::sample_image;
use crate::face::parser::{FaceInput, ParserKind, Parsing};
use crate::face::track::plan_track;
use crate::face::CropBox;
use crate::face::{crop_resize, DetectOptions, Detector, TrackOptions};
use crate::masking::{make_mask, Grid, ParsingMap, RngDraws, Strategy};
use crate::model::{Marlin, MarlinConfig, MaskIndices};
use crate::video::writer::VideoWriter;
use crate::video::{self, open_input, Frame, Input, VideoError};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use std::path::Path;

/// Which clip and which mask.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconstructOptions {
    pub strategy: Strategy,
    pub mask_ratio: f64,
    /// First frame of the clip.
    pub start: usize,
    pub sample_rate: usize,
    /// Seed of the mask's random draws.
    pub seed: u64,
    /// Detect and crop the face first (videos in the wild).
    pub crop_face: bool,
    /// The face parser of the Fasking strategies' label maps.
    pub parser: ParserKind,
}

impl Default for ReconstructOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Fasking,
            mask_ratio: 0.9,
            start: 0,
            sample_rate: 2,
            seed: 0,
            crop_face: false,
            parser: ParserKind::Mesh,
        }
    }
}

/// Why a clip could not be drawn. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ReconstructError {
    #[error(transparent)]
    Video(#[from] VideoError),
    #[error("{path}: {msg}")]
    Clip { path: String, msg: String },
    #[error(transparent)]
    Mask(#[from] crate::model::MaskError),
    #[error("{0}")]
    Options(String),
}

/// One clip's panels.
pub struct Reconstruction {
    /// Per frame: original | masked | reconstruction (`[H, 3W]`; `[H, 2W]` without a model).
    pub panels: Vec<image::RgbImage>,
    /// Visibility of each token (true = visible).
    pub visible: Vec<bool>,
    /// Whether a model predicted the masked patches.
    pub predicted: bool,
    /// Frames per second of the clip (the video's over the sample rate).
    pub fps: f64,
}

impl Reconstruction {
    /// The panels stacked top to bottom.
    pub fn grid(&self) -> image::RgbImage {
        let (w, h) = (self.panels[0].width(), self.panels[0].height());
        let mut grid = image::RgbImage::new(w, h * self.panels.len() as u32);
        for (i, p) in self.panels.iter().enumerate() {
            image::imageops::replace(&mut grid, p, 0, (i as u32 * h) as i64);
        }
        grid
    }

    /// The panels as an H.264 video at the clip's frame rate.
    pub fn save_mp4(&self, path: &Path) -> Result<(), VideoError> {
        let (w, h) = (
            self.panels[0].width() as usize,
            self.panels[0].height() as usize,
        );
        let mut wr = VideoWriter::create(path, w, h, self.fps)?;
        for p in &self.panels {
            wr.write(&Frame {
                width: w,
                height: h,
                data: p.as_raw().clone(),
            })?;
        }
        wr.finish()
    }
}

/// Mask a clip of `path` with `opts` (Fasking from parsing maps of the detected landmarks) and,
/// with a full `model`, reconstruct it.
pub fn reconstruct<B: Backend>(
    path: &Path,
    cfg: &MarlinConfig,
    model: Option<&Marlin<B>>,
    opts: &ReconstructOptions,
    device: &B::Device,
) -> Result<Reconstruction, ReconstructError> {
    if !(0.0..1.0).contains(&opts.mask_ratio) {
        return Err(ReconstructError::Options(
            "--mask-ratio must be in [0, 1)".into(),
        ));
    }
    let a = opts;
    let clip_err = |msg: String| ReconstructError::Clip {
        path: path.display().to_string(),
        msg,
    };
    let (t, size) = (cfg.clip_frames, cfg.img_size);
    let input = Input::from_path(path);
    let (mut reader, n, _) = open_input(&input, None)?;
    let picks: Vec<usize> = (0..t).map(|i| a.start + i * a.sample_rate.max(1)).collect();
    let last = *picks.last().unwrap_or(&0);
    if n > 0 && last >= n {
        return Err(clip_err(format!(
            "{n} frames; a clip of {t} frames from {} at rate {} needs {}",
            a.start,
            a.sample_rate,
            last + 1
        )));
    }
    let raw: Vec<Frame> = video::clip::read_indices(reader.as_mut(), &picks)?
        .into_iter()
        .map(|f| (*f).clone())
        .collect();
    if raw.len() < picks.len() {
        return Err(clip_err(format!("ended at frame {}", picks[raw.len()])));
    }
    let det = Detector::<B>::new(device, DetectOptions::default())
        .map_err(|e| clip_err(e.to_string()))?;
    let frames: Vec<Frame> = if a.crop_face {
        let refs: Vec<&Frame> = raw.iter().collect();
        let dets: Vec<Option<Vec<crate::face::Face>>> =
            det.detect(&refs).into_iter().map(Some).collect();
        let track = plan_track(&dets, &vec![true; raw.len()], &TrackOptions::default())
            .map_err(|e| clip_err(e.to_string()))?;
        raw.iter()
            .zip(&track.frames)
            .map(|(f, tf)| crop_resize(f, &tf.crop, size))
            .collect()
    } else {
        raw.iter()
            .map(|f| video::resize_frame(f, size, size))
            .collect()
    };
    // Parsing maps of each tubelet's first frame (the Fasking strategies read them), of the
    // largest face the detector finds there.
    let tub = cfg.tubelet_size;
    let firsts: Vec<&Frame> = frames.iter().step_by(tub).collect();
    let parsing: Vec<Option<ParsingMap>> =
        if matches!(a.strategy, Strategy::Fasking | Strategy::FaskingOpp) {
            let parser =
                Parsing::<B>::new(a.parser, device).map_err(|e| clip_err(e.to_string()))?;
            let whole = CropBox {
                x0: 0,
                y0: 0,
                side: size as i64,
            };
            let found: Vec<Option<crate::face::Face>> = det
                .detect(&firsts)
                .into_iter()
                .map(|faces| {
                    faces
                        .into_iter()
                        .max_by(|x, y| x.area().total_cmp(&y.area()))
                })
                .collect();
            let inputs: Vec<FaceInput> = firsts
                .iter()
                .zip(&found)
                .filter_map(|(f, face)| {
                    face.map(|face| FaceInput {
                        frame: f,
                        crop: whole,
                        face: Some(face),
                    })
                })
                .collect();
            let mut maps = parser.maps(&inputs, size).into_iter();
            found
                .iter()
                .map(|face| face.and_then(|_| maps.next().flatten()))
                .collect()
        } else {
            vec![None; firsts.len()]
        };
    let g = cfg.img_size / cfg.patch_size;
    let grid = Grid {
        tubelets: t / tub,
        grid_h: g,
        grid_w: g,
        patch: cfg.patch_size,
    };
    let refs: Vec<Option<&ParsingMap>> = parsing.iter().map(Option::as_ref).collect();
    let visible = make_mask(
        a.strategy,
        a.mask_ratio,
        &refs,
        &grid,
        &mut RngDraws::new(a.seed),
    );
    let plane = t * size * size;
    let mut clip = vec![0f32; 3 * plane];
    for (ti, f) in frames.iter().enumerate() {
        for (p, px) in f.data.chunks_exact(3).enumerate() {
            let o = ti * size * size + p;
            for c in 0..3 {
                clip[c * plane + o] = px[c] as f32 / 255.0;
            }
        }
    }
    let pred: Option<Vec<f32>> = match model.filter(|m| m.decoder.is_some()) {
        Some(m) => {
            let x = Tensor::<B, 5>::from_data(
                TensorData::new(clip.clone(), [1, 3, t, size, size]),
                device,
            );
            let idx = MaskIndices::from_bools(&visible, 1)?;
            Some(crate::model::load::to_f32_vec(m.forward_indices(x, &idx)?))
        }
        None => None,
    };
    let settings = ClipSettings {
        clip_frames: t,
        sample_rate: a.sample_rate,
        img_size: size,
        grid,
        tubelet: tub,
        strategy: a.strategy,
        mask_ratio: a.mask_ratio,
    };
    let panels: Vec<image::RgbImage> = (0..t)
        .map(|f| sample_image(&clip, &visible, pred.as_deref(), &settings, f))
        .collect();
    let fps = match &input {
        Input::Video(v) => video::probe(v).map(|i| i.fps).unwrap_or(25.0),
        Input::Frames(_) => 25.0,
    } / a.sample_rate.max(1) as f64;
    Ok(Reconstruction {
        predicted: pred.is_some(),
        panels,
        visible,
        fps,
    })
}
