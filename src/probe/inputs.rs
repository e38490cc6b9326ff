//! What a downstream run reads (features or clips of videos), and why a run or its inputs
//! failed: the types that the feature reader ([`super::features`]) and the training loop
//! ([`super::train`]) share.

use crate::video::clip::{self, to_clip, ClipData};
use crate::video::VideoError;
use crate::video::{open_input, Input};
use rand::rngs::StdRng;

/// Why a downstream run or its inputs failed. One line naming the file (and row).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Features or clips that cannot be read or used (`file:row: what`).
    #[error("{0}")]
    Input(String),
    /// A run's hook (checkpoint, report) failed.
    #[error("{0}")]
    Report(String),
    #[error("no epoch finished")]
    NoEpoch,
    /// The training engine's step failed (the device, or a batch it was not built for).
    #[error("training engine: {0}")]
    Engine(String),
    /// Another rank of a multi-process run is gone, or the ranks disagree.
    #[error(transparent)]
    Dist(#[from] crate::distributed::DistError),
}

/// A message naming the file (and row): an input that cannot be used.
impl From<String> for ProbeError {
    fn from(msg: String) -> Self {
        ProbeError::Input(msg)
    }
}

/// Where the inputs of a run come from.
pub enum Inputs {
    /// Features per split, `[n, d]` row-major (already reduced over windows).
    Features {
        d: usize,
        train: Vec<f32>,
        val: Vec<f32>,
        test: Vec<f32>,
    },
    /// Videos, read as one clip each time a sample is used.
    Clips(ClipSpec),
}

/// How fine-tuning reads a clip from a video: `clip_frames` frames `sample_rate` apart (fewer
/// frames: a lower rate, then padding with the last frame, as the reference), frames resized
/// to `size`. Training clips start at random; evaluation clips are centred.
#[derive(Debug, Clone)]
pub struct ClipSpec {
    pub clip_frames: usize,
    pub sample_rate: usize,
    pub size: usize,
}

impl ClipSpec {
    /// Read one clip; `rng` picks the start (None: the centred clip).
    pub fn read(
        &self,
        video: &std::path::Path,
        rng: Option<&mut StdRng>,
    ) -> Result<ClipData, VideoError> {
        let input = Input::Video(video.to_path_buf());
        let (mut reader, n, _) = open_input(&input, Some((self.size, self.size)))?;
        let t = self.clip_frames;
        let wanted = clip::sample_indices(n, t, self.sample_rate, rng);
        let mut frames = clip::read_indices(reader.as_mut(), &wanted)?;
        let Some(last) = frames.last().cloned() else {
            return Err(VideoError::Other {
                path: video.display().to_string(),
                msg: "no frame could be decoded".into(),
            });
        };
        frames.resize(t, last);
        Ok(to_clip(&frames))
    }
}
