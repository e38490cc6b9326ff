//! Pretraining data in the reference layout, read ahead by worker threads:
//!
//! - `DATA/train_set.csv`, `DATA/val_set.csv`: a `path` column (YouTube Faces style
//!   `person/video`), other columns ignored;
//! - `DATA/crop_images_DB/<path>/`: the face-cropped frames (any image type, natural order);
//! - `DATA/face_parsing_images_DB/<path>/<frame stem>.npy` (or `.png`): LaPa label maps of the
//!   frames, read for the Fasking strategies (a missing or empty map = no parsed face).
//!
//! A clip is `clip_frames` frames `sample_rate` apart from a random start (fewer frames: a
//! lower rate, then the last frame repeated), with its mask. Everything random about a clip
//! comes from (seed, epoch, clip index), so a run is repeatable, whatever the thread timing, and
//! a resumed run continues with the same draws.

use super::TrainError;
use crate::masking::{make_mask, Draws, Grid, ParsingMap, RngDraws, Strategy};
use crate::model::MarlinConfig;
use crate::video::{self, natural_cmp};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, RngExt, SeedableRng};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// One clip ready for a step: `[3, T, H, W]` in [0, 1] and its visibility `[N]`.
pub struct Sample {
    pub clip: Vec<f32>,
    pub visible: Vec<bool>,
}

/// A split of a pretraining dataset.
pub struct Split {
    pub root: PathBuf,
    /// Relative video paths (`person/video`).
    pub videos: Vec<String>,
}

impl Split {
    /// `DATA/{split}_set.csv` (split: train or val).
    pub fn load(root: &Path, split: &str) -> Result<Self, TrainError> {
        let csv = root.join(format!("{split}_set.csv"));
        let mut r = csv::Reader::from_path(&csv).map_err(|e| format!("{}: {e}", csv.display()))?;
        let headers = r
            .headers()
            .map_err(|e| format!("{}: {e}", csv.display()))?
            .clone();
        let col = headers
            .iter()
            .position(|h| h == "path")
            .ok_or_else(|| format!("{}: no 'path' column", csv.display()))?;
        let mut videos = Vec::new();
        for (i, rec) in r.records().enumerate() {
            let rec = rec.map_err(|e| format!("{}:{}: {e}", csv.display(), i + 2))?;
            let p = rec.get(col).unwrap_or("").trim().to_string();
            if p.is_empty() {
                continue;
            }
            let dir = root.join("crop_images_DB").join(&p);
            if !dir.is_dir() {
                return Err(format!(
                    "{}:{}: {} not found (run `marlin prepare`)",
                    csv.display(),
                    i + 2,
                    dir.display()
                )
                .into());
            }
            videos.push(p);
        }
        if videos.is_empty() {
            return Err(format!("{}: no videos", csv.display()).into());
        }
        Ok(Self {
            root: root.to_path_buf(),
            videos,
        })
    }
}

/// How clips are made.
#[derive(Debug, Clone)]
pub struct ClipSettings {
    pub clip_frames: usize,
    pub sample_rate: usize,
    pub img_size: usize,
    pub grid: Grid,
    pub tubelet: usize,
    pub strategy: Strategy,
    pub mask_ratio: f64,
}

impl ClipSettings {
    pub fn from_config(cfg: &MarlinConfig) -> Result<Self, TrainError> {
        let g = cfg.img_size / cfg.patch_size;
        Ok(Self {
            clip_frames: cfg.clip_frames,
            sample_rate: cfg.temporal_sample_rate.max(1),
            img_size: cfg.img_size,
            grid: Grid {
                tubelets: cfg.clip_frames / cfg.tubelet_size,
                grid_h: g,
                grid_w: g,
                patch: cfg.patch_size,
            },
            tubelet: cfg.tubelet_size,
            strategy: cfg.mask_strategy.parse()?,
            mask_ratio: cfg.mask_percentage_target,
        })
    }
}

/// The generator of clip `index` of `epoch` (split salt keeps train and val apart).
pub fn clip_rng(seed: u64, epoch: usize, index: usize, salt: u64) -> StdRng {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [epoch as u64, index as u64, salt] {
        h = (h ^ v).wrapping_mul(0x1000_0000_01B3).rotate_left(23);
    }
    StdRng::seed_from_u64(h)
}

/// The order of the training clips of `epoch`: a permutation seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut clip_rng(seed, epoch, usize::MAX, 7));
    v
}

fn read_parsing(path: &Path, size: usize) -> Option<ParsingMap> {
    let labels_of = |w: usize, h: usize, labels: Vec<u8>| {
        (w > 0 && h > 0).then_some(ParsingMap {
            width: w,
            height: h,
            labels,
        })
    };
    let map = if path.extension().is_some_and(|e| e == "npy") {
        let a: ndarray::ArrayD<i64> = ndarray_npy::read_npy(path)
            .ok()
            .or_else(|| {
                ndarray_npy::read_npy::<_, ndarray::ArrayD<u8>>(path)
                    .ok()
                    .map(|a| a.mapv(i64::from))
            })
            .or_else(|| {
                ndarray_npy::read_npy::<_, ndarray::ArrayD<i32>>(path)
                    .ok()
                    .map(|a| a.mapv(i64::from))
            })?;
        if a.ndim() != 2 {
            return None;
        }
        let (h, w) = (a.shape()[0], a.shape()[1]);
        labels_of(w, h, a.iter().map(|&v| v.clamp(0, 255) as u8).collect())?
    } else {
        let img = image::open(path).ok()?.to_luma8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        labels_of(w, h, img.into_raw())?
    };
    if map.width == size && map.height == size {
        return Some(map);
    }
    // Nearest-neighbour resize of labels to the model's input size.
    let mut labels = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let sy = y * map.height / size;
            let sx = x * map.width / size;
            labels[y * size + x] = map.labels[sy * map.width + sx];
        }
    }
    Some(ParsingMap {
        width: size,
        height: size,
        labels,
    })
}

/// Read clip `index` of `split` with the draws of `rng`.
pub fn read_sample(
    split: &Split,
    index: usize,
    s: &ClipSettings,
    rng: &mut StdRng,
) -> Result<Sample, TrainError> {
    let rel = &split.videos[index];
    let dir = split.root.join("crop_images_DB").join(rel);
    let mut files = video::list_frames(&dir).map_err(|e| e.to_string())?;
    files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    let t = s.clip_frames;
    let picks = video::clip::sample_indices(files.len(), t, s.sample_rate, Some(rng));
    let size = s.img_size;
    let plane = t * size * size;
    let mut clip = vec![0f32; 3 * plane];
    let mut parsing: Vec<Option<ParsingMap>> = Vec::new();
    for (ti, &fi) in picks.iter().enumerate() {
        let img = video::read_rgb(&files[fi]).map_err(|e| e.to_string())?;
        let img = if (img.width() as usize, img.height() as usize) != (size, size) {
            image::imageops::resize(
                &img,
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            )
        } else {
            img
        };
        for (p, px) in img.as_raw().chunks_exact(3).enumerate() {
            let o = ti * size * size + p;
            clip[o] = px[0] as f32 / 255.0;
            clip[plane + o] = px[1] as f32 / 255.0;
            clip[2 * plane + o] = px[2] as f32 / 255.0;
        }
        if ti % s.tubelet == 0 {
            let map = if matches!(s.strategy, Strategy::Fasking | Strategy::FaskingOpp) {
                let stem = files[fi]
                    .file_stem()
                    .map(|x| x.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let base = split.root.join("face_parsing_images_DB").join(rel);
                [format!("{stem}.npy"), format!("{stem}.png")]
                    .iter()
                    .map(|f| base.join(f))
                    .find(|p| p.is_file())
                    .and_then(|p| read_parsing(&p, size))
            } else {
                None
            };
            parsing.push(map);
        }
    }
    let refs: Vec<Option<&ParsingMap>> = parsing.iter().map(Option::as_ref).collect();
    let mut draws = RngDraws(StdRng::seed_from_u64(rng.random::<u64>()));
    let visible = make_mask(
        s.strategy,
        s.mask_ratio,
        &refs,
        &s.grid,
        &mut draws as &mut dyn Draws,
    );
    Ok(Sample { clip, visible })
}

/// Read the clips `indices` of `split` for `epoch`, in parallel (a batch).
pub fn read_batch(
    split: &Split,
    indices: &[usize],
    s: &ClipSettings,
    seed: u64,
    epoch: usize,
    salt: u64,
) -> Result<Vec<Sample>, TrainError> {
    indices
        .par_iter()
        .map(|&i| {
            let mut rng = clip_rng(seed, epoch, i, salt);
            read_sample(split, i, s, &mut rng)
                .map_err(|e| TrainError::Run(format!("{}: {e}", split.videos[i])))
        })
        .collect()
}
