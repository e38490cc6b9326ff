//! A pretraining dataset from raw videos, as `marlin prepare` makes it: every video's face crops
//! and parsing maps ([`crate::face::prepare::prepare_video`]), then the split CSVs over every
//! prepared video ([`write_splits`], read back by [`super::data::Split::load`]). Videos already
//! prepared are skipped, a video that fails is recorded and the rest go on, and a stop request
//! leaves every finished video complete, so running again resumes.

use super::TrainError;
use crate::extract::batch::Failure;
use crate::extract::inputs::{discover, DiscoverOptions, OutputName};
use crate::extract::ExtractError;
use crate::face::parser::Parsing;
use crate::face::prepare::{prepare_video, FaceSteps};
use crate::face::track::TrackOptions;
use crate::face::Detector;
use crate::util::write_atomic;
use burn::tensor::backend::Backend;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// What [`prepare_dataset`] writes and how.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The dataset root: `crop_images_DB/`, `face_parsing_images_DB/`, `train_set.csv`,
    /// `val_set.csv`.
    pub out: PathBuf,
    /// Side of the face crops.
    pub size: usize,
    pub track: TrackOptions,
    /// File patterns of videos when walking a directory (comma-separated).
    pub glob: String,
    /// Redo videos already prepared.
    pub overwrite: bool,
    /// Share of videos in `val_set.csv`, and the seed of the split.
    pub val_ratio: f64,
    pub seed: u64,
}

impl PrepareOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            size: 224,
            track: TrackOptions::default(),
            glob: DiscoverOptions::new("").glob,
            overwrite: false,
            val_ratio: 0.1,
            seed: 0,
        }
    }
}

/// What a preparation run did.
#[derive(Debug, Default)]
pub struct PrepareSummary {
    /// Inputs found, prepared by this run, skipped as already prepared.
    pub total: usize,
    pub written: usize,
    pub skipped: usize,
    /// Inputs that could not be read or prepared, each with its one-line error.
    pub failures: Vec<Failure>,
    /// True when the stop request ended the run early.
    pub interrupted: bool,
    /// Videos in the split CSVs (this run's and earlier ones).
    pub train: usize,
    pub val: usize,
}

/// Why a preparation run could not go on (a failing video is not one: it is recorded).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Inputs(#[from] ExtractError),
    #[error(transparent)]
    Splits(#[from] TrainError),
}

/// Prepare every video of `inputs` (files, frame folders, folders to walk) into `opts.out`,
/// label maps by `parsing` (`Parsing::new(ParserKind::Mesh, device)` is the default parser).
/// `on_video(done, todo, name)` is called before each video; `stop` is checked between frames.
pub fn prepare_dataset<B: Backend>(
    inputs: &[PathBuf],
    detector: &Detector<B>,
    parsing: &Parsing<B>,
    opts: &PrepareOptions,
    on_video: &mut dyn FnMut(usize, usize, &Path),
    stop: &dyn Fn() -> bool,
) -> Result<PrepareSummary, PrepareError> {
    let found = discover(
        inputs,
        &DiscoverOptions {
            glob: opts.glob.clone(),
            name: OutputName::Stem,
            ..DiscoverOptions::new(&opts.out)
        },
    )?;
    let crops = opts.out.join("crop_images_DB");
    let mut s = PrepareSummary {
        total: found.items.len(),
        failures: found.failures,
        ..Default::default()
    };
    let todo: Vec<_> = found
        .items
        .into_iter()
        .map(|it| {
            let rel = it
                .out
                .strip_prefix(&opts.out)
                .unwrap_or(&it.out)
                .to_path_buf();
            (it.input, rel)
        })
        .filter(|(_, rel)| opts.overwrite || !crops.join(rel).is_dir())
        .collect();
    s.skipped = s.total - todo.len();
    for (i, (input, rel)) in todo.iter().enumerate() {
        if stop() {
            break;
        }
        on_video(i, todo.len(), rel);
        let steps = FaceSteps {
            detector,
            track: &opts.track,
            parsing,
            size: opts.size,
        };
        match prepare_video(input, rel, &opts.out, &steps, stop) {
            Ok(_) => s.written += 1,
            // An interrupted video leaves nothing behind and is not a failure.
            Err(_) if stop() => {}
            Err(e) => s.failures.push(Failure::new(input, e)),
        }
    }
    s.interrupted = stop();
    (s.train, s.val) = write_splits(&opts.out, opts.seed, opts.val_ratio)?;
    Ok(s)
}

/// `train_set.csv` and `val_set.csv` (`path,len`) over every non-empty video folder under
/// `data/crop_images_DB`, a seeded share `val_ratio` of them (at least one of each when there
/// are two or more) in val. Returns the (train, val) counts; writes nothing when there is no
/// video.
pub fn write_splits(data: &Path, seed: u64, val_ratio: f64) -> Result<(usize, usize), TrainError> {
    let crops = data.join("crop_images_DB");
    let mut rows: Vec<(String, usize)> = Vec::new();
    for e in walkdir::WalkDir::new(&crops)
        .sort_by_file_name()
        .into_iter()
        .flatten()
    {
        if e.file_type().is_dir() {
            let n = std::fs::read_dir(e.path())
                .map(|rd| rd.flatten().filter(|f| f.path().is_file()).count())
                .unwrap_or(0);
            let name = e.file_name().to_string_lossy().into_owned();
            if n > 0 && !name.starts_with('.') {
                let rel = e.path().strip_prefix(&crops).unwrap_or(e.path());
                rows.push((rel.to_string_lossy().replace('\\', "/"), n));
            }
        }
    }
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n_val = if rows.len() >= 2 {
        ((rows.len() as f64 * val_ratio).round() as usize).clamp(1, rows.len() - 1)
    } else {
        0
    };
    let (val, train) = idx.split_at(n_val);
    for (file, part) in [("train_set.csv", train), ("val_set.csv", val)] {
        let mut text = String::from("path,len\n");
        let mut sorted = part.to_vec();
        sorted.sort();
        for i in sorted {
            text += &format!("{},{}\n", rows[i].0, rows[i].1);
        }
        let p = data.join(file);
        write_atomic(&p, text.as_bytes()).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok((train.len(), val.len()))
}
