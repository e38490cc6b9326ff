//! Options of face detection and cropping, shared by `extract --crop-face`, `crop` and `detect`.

use clap::Args;
use marlin::face::{DetectOptions, FaceSelect, TrackOptions};

#[derive(Args, Debug, Clone)]
pub struct FaceArgs {
    /// Which face to follow when a frame has several: largest box or highest score.
    #[arg(long, default_value = "largest", value_parser = super::names::<FaceSelect>(&FaceSelect::NAMES))]
    pub face_select: FaceSelect,
    /// Smooth the face boxes over this many frames (centred moving average; 0: off).
    #[arg(long, default_value_t = 0)]
    pub smooth: usize,
    /// Enlarge the square crop by this fraction of its side (0: the reference's crop).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f32,
    /// Smallest face side searched, in pixels; larger is faster.
    #[arg(long, default_value_t = 20.0)]
    pub min_face_size: f64,
    /// Detect on frames scaled down to this longest side (0: full resolution); 640 makes HD
    /// video several times faster, and the smallest face found grows by the same factor.
    #[arg(long, default_value_t = 0)]
    pub detect_max_side: usize,
    /// Run the detector on every N-th frame only; the others take the nearest box.
    #[arg(long, default_value_t = 1)]
    pub detect_every: usize,
    /// Frames per detector pass.
    #[arg(long, default_value_t = 16)]
    pub detect_batch: usize,
}

impl FaceArgs {
    pub fn check(&self) -> Result<(), String> {
        if self.detect_every == 0 || self.detect_batch == 0 {
            return Err("--detect-every and --detect-batch must be at least 1".into());
        }
        if self.min_face_size.is_nan() || self.min_face_size < 12.0 {
            return Err("--min-face-size must be at least 12 (MTCNN's smallest window)".into());
        }
        if !self.margin.is_finite() || self.margin <= -0.5 {
            return Err("--margin must be a fraction above -0.5 (0.2 = 20% larger)".into());
        }
        Ok(())
    }
    pub fn detect_options(&self) -> DetectOptions {
        DetectOptions {
            min_face_size: self.min_face_size,
            max_side: (self.detect_max_side > 0).then_some(self.detect_max_side),
            ..Default::default()
        }
    }
    pub fn track_options(&self) -> TrackOptions {
        TrackOptions {
            select: self.face_select,
            smooth: self.smooth,
            margin: self.margin,
            detect_every: self.detect_every,
            batch: self.detect_batch,
        }
    }
}
