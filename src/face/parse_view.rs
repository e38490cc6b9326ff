//! `marlin parse`: one frame of an image or video, its face found and cropped as everywhere
//! else, the crop's LaPa label map from each asked parser, and a picture a person can check:
//! per parser a row of crop | labels over the crop | the Fasking mask of a tubelet starting at
//! that frame (masked patches dimmed).

use super::crop::{crop_resize, CropBox};
use super::detect::{Detector, Face};
use super::parser::{FaceInput, ParserKind, Parsing};
use crate::masking::{make_mask, Grid, ParsingMap, RngDraws, Strategy};
use crate::video::{open_input, Frame, Input, VideoError};
use burn::tensor::backend::Backend;
use std::path::Path;

/// Colours of the LaPa labels 0..=10 in pictures.
pub const PALETTE: [[u8; 3]; 11] = [
    [0, 0, 0],
    [230, 180, 140],
    [255, 230, 0],
    [255, 140, 0],
    [0, 120, 255],
    [0, 220, 255],
    [0, 200, 0],
    [255, 0, 120],
    [120, 0, 60],
    [200, 0, 255],
    [140, 70, 20],
];

/// What to parse and how.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// The frame of a video or frame folder (0 for an image).
    pub frame: usize,
    /// Side of the crop and the map.
    pub size: usize,
    /// Enlarge the crop square by this share (0 = the reference's crop).
    pub margin: f32,
    /// Mask ratio of the pictured Fasking mask, and the patch side of the model.
    pub mask_ratio: f64,
    pub patch: usize,
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            frame: 0,
            size: 224,
            margin: 0.0,
            mask_ratio: 0.9,
            patch: 16,
        }
    }
}

/// One parsed frame.
#[derive(Debug, Clone)]
pub struct FrameParse {
    /// The face (largest detection, frame pixels) and its crop.
    pub face: Face,
    pub crop_box: CropBox,
    pub crop: Frame,
    /// Each parser's map (None: the parser found no face in the crop).
    pub maps: Vec<(ParserKind, Option<ParsingMap>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Video(#[from] VideoError),
    #[error("{path}: frame {frame} is past the last frame ({frames} frames)")]
    PastEnd {
        path: String,
        frame: usize,
        frames: usize,
    },
    #[error("{path}: no face found in frame {frame}")]
    NoFace { path: String, frame: usize },
}

/// Read frame `opts.frame` of `path`, find its largest face, crop and parse it with each of
/// `parsers`.
pub fn parse_frame<B: Backend>(
    path: &Path,
    detector: &Detector<B>,
    parsers: &[(ParserKind, &Parsing<B>)],
    opts: &ParseOptions,
) -> Result<FrameParse, ParseError> {
    let name = path.display().to_string();
    let (mut reader, _, _) = open_input(&Input::from_path(path), None)?;
    let mut frame = None;
    for i in 0..=opts.frame {
        match reader.next_frame()? {
            Some(f) if i == opts.frame => frame = Some(f),
            Some(_) => {}
            None => {
                return Err(ParseError::PastEnd {
                    path: name,
                    frame: opts.frame,
                    frames: i,
                })
            }
        }
    }
    let frame = frame.ok_or_else(|| ParseError::PastEnd {
        path: name.clone(),
        frame: opts.frame,
        frames: 0,
    })?;
    let face = detector
        .detect(&[&frame])
        .into_iter()
        .flatten()
        .max_by(|a, b| a.area().total_cmp(&b.area()))
        .ok_or(ParseError::NoFace {
            path: name,
            frame: opts.frame,
        })?;
    let crop_box = CropBox::around(face.bbox, opts.margin);
    let input = FaceInput {
        frame: &frame,
        crop: crop_box,
        face: Some(face),
    };
    let maps = parsers
        .iter()
        .map(|(kind, p)| (*kind, p.maps(&[input], opts.size).pop().flatten()))
        .collect();
    Ok(FrameParse {
        crop: crop_resize(&frame, &crop_box, opts.size),
        face,
        crop_box,
        maps,
    })
}

/// The labels over the crop: each non-background pixel blended half with its label's colour.
pub fn overlay(crop: &Frame, map: &ParsingMap) -> Frame {
    let mut out = crop.clone();
    for (i, &l) in map.labels.iter().enumerate() {
        if l == 0 || l as usize >= PALETTE.len() {
            continue;
        }
        for (v, &p) in out.data[i * 3..i * 3 + 3]
            .iter_mut()
            .zip(&PALETTE[l as usize])
        {
            *v = ((*v as u16 + p as u16) / 2) as u8;
        }
    }
    out
}

/// The Fasking mask of a tubelet whose first frame has `map`, at `mask_ratio`: masked patches
/// dimmed to a third, with a grid.
pub fn fasking_view(crop: &Frame, map: &ParsingMap, mask_ratio: f64, patch: usize) -> Frame {
    let g = crop.width / patch;
    let grid = Grid {
        tubelets: 1,
        grid_h: g,
        grid_w: g,
        patch,
    };
    let visible = make_mask(
        Strategy::Fasking,
        mask_ratio,
        &[Some(map)],
        &grid,
        &mut RngDraws::new(0),
    );
    let mut out = crop.clone();
    for y in 0..crop.height {
        for x in 0..crop.width {
            let cell = (y / patch).min(g - 1) * g + (x / patch).min(g - 1);
            let o = (y * crop.width + x) * 3;
            if x % patch == 0 || y % patch == 0 {
                out.data[o..o + 3].copy_from_slice(&[90, 90, 90]);
            } else if !visible[cell] {
                for c in 0..3 {
                    out.data[o + c] /= 3;
                }
            }
        }
    }
    out
}

impl FrameParse {
    /// Per parser a row: crop | labels over the crop | Fasking mask (the crop alone where the
    /// parser found no face; white beside it).
    pub fn picture(&self, opts: &ParseOptions) -> Frame {
        let (w, h) = (self.crop.width as u32, self.crop.height as u32);
        let mut img =
            image::RgbImage::from_pixel(3 * w, h * self.maps.len() as u32, image::Rgb([255; 3]));
        for (row, (_, map)) in self.maps.iter().enumerate() {
            let panels = match map {
                Some(m) => vec![
                    self.crop.clone(),
                    overlay(&self.crop, m),
                    fasking_view(&self.crop, m, opts.mask_ratio, opts.patch),
                ],
                None => vec![self.crop.clone()],
            };
            for (col, p) in panels.into_iter().enumerate() {
                // A panel's buffer is w * h * 3 bytes by construction.
                if let Some(p) = image::RgbImage::from_raw(w, h, p.data) {
                    image::imageops::replace(
                        &mut img,
                        &p,
                        (col as u32 * w) as i64,
                        (row as u32 * h) as i64,
                    );
                }
            }
        }
        Frame {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.into_raw(),
        }
    }
}
