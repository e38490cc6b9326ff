//! A face track through a video: detect on the frames that matter, pick one face per frame,
//! give frames without a detection the nearest detected box (before or after), smooth the boxes
//! over time, and turn them into crop squares. A video with no face at all is an error, never a
//! garbage crop (the reference crops a 2x2 corner patch then).

use super::crop::CropBox;
use super::detect::{Detector, Face};
use crate::video::{Frame, FrameReader, VideoError};
use burn::tensor::backend::Backend;

/// Which face to follow when a frame has several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FaceSelect {
    /// The largest box (facenet-pytorch's default, usually the subject).
    #[default]
    Largest,
    /// The most confident detection.
    Score,
}

impl FaceSelect {
    /// The names [`FaceSelect::from_str`](std::str::FromStr) takes.
    pub const NAMES: [&str; 2] = ["largest", "score"];
}

impl std::str::FromStr for FaceSelect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "largest" => Ok(Self::Largest),
            "score" => Ok(Self::Score),
            _ => Err(format!("face selection '{s}': expected largest or score")),
        }
    }
}

/// No face in any examined frame (the reference would crop a 2x2 corner patch instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no face found in any of the {examined} frames examined")]
pub struct NoFace {
    pub examined: usize,
}

/// How a track is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrackOptions {
    pub select: FaceSelect,
    /// Centred moving average of box centre and size over this many frames (0 or 1: off).
    pub smooth: usize,
    /// Enlarge the crop square by this fraction of its side (0: the reference's crop).
    pub margin: f32,
    /// Detect on every N-th frame of those used (1: all); the others take the nearest box.
    pub detect_every: usize,
    /// Frames per detector pass.
    pub batch: usize,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self {
            select: FaceSelect::Largest,
            smooth: 0,
            margin: 0.0,
            detect_every: 1,
            batch: 16,
        }
    }
}

/// One frame of a track.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrackFrame {
    /// Frame index in the video.
    pub index: usize,
    /// The selected detection on this frame, if the detector ran and found one.
    pub face: Option<Face>,
    /// Whether the detector ran on this frame.
    pub examined: bool,
    /// The crop square used for this frame (after gap filling and smoothing).
    pub crop: CropBox,
}

/// The track of one video: a crop for each frame that was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub frames: Vec<TrackFrame>,
    /// Frames the detector ran on, and how many of those had a face.
    pub examined: usize,
    pub detected: usize,
}

impl Track {
    /// The crop for each frame index up to the last asked for (`None` for frames not asked
    /// for).
    pub fn crops(&self) -> Vec<Option<CropBox>> {
        let n = self.frames.last().map(|f| f.index + 1).unwrap_or(0);
        let mut v = vec![None; n];
        for f in &self.frames {
            v[f.index] = Some(f.crop);
        }
        v
    }
}

/// Run the detector over the frames of `reader` where `wanted[i]`, every `detect_every`-th of
/// them, in batches. Returns the faces per frame (`None` where it did not run).
pub fn detect_frames<B: Backend>(
    reader: &mut dyn FrameReader,
    wanted: &[bool],
    detector: &Detector<B>,
    opts: &TrackOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<Option<Vec<Face>>>, VideoError> {
    let mut out: Vec<Option<Vec<Face>>> = vec![None; wanted.len()];
    detect_stream(reader, wanted, detector, opts, stop, &mut |i, _, faces| {
        out[i] = Some(faces);
        Ok(())
    })?;
    Ok(out)
}

/// As [`detect_frames`], handing each examined frame and its faces to `sink` in order (to draw
/// or save them) instead of collecting. Returns the number of frames examined.
pub fn detect_stream<B: Backend>(
    reader: &mut dyn FrameReader,
    wanted: &[bool],
    detector: &Detector<B>,
    opts: &TrackOptions,
    stop: &dyn Fn() -> bool,
    sink: &mut dyn FnMut(usize, Frame, Vec<Face>) -> Result<(), VideoError>,
) -> Result<usize, VideoError> {
    let mut batch: Vec<(usize, Frame)> = Vec::new();
    let mut seen = 0usize;
    let mut examined = 0usize;
    let every = opts.detect_every.max(1);
    let mut run = |batch: &mut Vec<(usize, Frame)>| -> Result<(), VideoError> {
        let frames: Vec<&Frame> = batch.iter().map(|(_, f)| f).collect();
        let faces = detector.detect(&frames);
        for ((i, f), faces) in batch.drain(..).zip(faces) {
            sink(i, f, faces)?;
        }
        Ok(())
    };
    for (i, &w) in wanted.iter().enumerate() {
        if stop() {
            break;
        }
        let examine = w && seen.is_multiple_of(every);
        if w {
            seen += 1;
        }
        if examine {
            match reader.next_frame()? {
                Some(f) => batch.push((i, f)),
                None => break,
            }
            examined += 1;
            if batch.len() >= opts.batch.max(1) {
                run(&mut batch)?;
            }
        } else if !reader.skip_frame()? {
            break;
        }
    }
    if !batch.is_empty() {
        run(&mut batch)?;
    }
    Ok(examined)
}

/// Build the track for the frames where `wanted[i]` from the detections of [`detect_frames`].
/// Errors (as a message) when no examined frame has a face.
pub fn plan_track(
    detections: &[Option<Vec<Face>>],
    wanted: &[bool],
    opts: &TrackOptions,
) -> Result<Track, NoFace> {
    let chosen: Vec<Option<Face>> = detections
        .iter()
        .map(|d| {
            d.as_ref().and_then(|faces| match opts.select {
                FaceSelect::Largest => faces
                    .iter()
                    .max_by(|a, b| a.area().total_cmp(&b.area()))
                    .copied(),
                FaceSelect::Score => faces
                    .iter()
                    .max_by(|a, b| a.score.total_cmp(&b.score))
                    .copied(),
            })
        })
        .collect();
    let examined = detections.iter().filter(|d| d.is_some()).count();
    let hits: Vec<usize> = (0..chosen.len()).filter(|&i| chosen[i].is_some()).collect();
    if hits.is_empty() {
        return Err(NoFace { examined });
    }
    // Nearest detection for each wanted frame (ties go to the earlier one).
    let idx: Vec<usize> = (0..wanted.len().min(chosen.len()))
        .filter(|&i| wanted[i])
        .collect();
    let boxes: Vec<[f32; 4]> = idx
        .iter()
        .map(|&i| {
            let p = hits.partition_point(|&h| h < i);
            let after = hits.get(p).copied();
            let before = p.checked_sub(1).map(|k| hits[k]);
            let near = match (before, after) {
                (Some(b), Some(a)) => {
                    if i - b <= a - i {
                        b
                    } else {
                        a
                    }
                }
                (Some(b), None) => b,
                (None, Some(a)) => a,
                (None, None) => unreachable!("hits is not empty"),
            };
            chosen[near].map(|f| f.bbox).unwrap_or_default()
        })
        .collect();
    let boxes = smooth(&boxes, opts.smooth);
    let frames = idx
        .iter()
        .zip(&boxes)
        .map(|(&i, b)| TrackFrame {
            index: i,
            face: chosen[i],
            examined: detections[i].is_some(),
            crop: CropBox::around(*b, opts.margin),
        })
        .collect();
    Ok(Track {
        frames,
        examined,
        detected: hits.len(),
    })
}

/// Centred moving average of box centre and size over `window` consecutive entries (the
/// window shrinks at the ends).
pub fn smooth(boxes: &[[f32; 4]], window: usize) -> Vec<[f32; 4]> {
    if window <= 1 || boxes.len() < 2 {
        return boxes.to_vec();
    }
    let half = window / 2;
    let csw: Vec<[f32; 4]> = boxes
        .iter()
        .map(|b| {
            [
                (b[0] + b[2]) / 2.0,
                (b[1] + b[3]) / 2.0,
                b[2] - b[0],
                b[3] - b[1],
            ]
        })
        .collect();
    (0..boxes.len())
        .map(|i| {
            let (a, z) = (i.saturating_sub(half), (i + half + 1).min(boxes.len()));
            let mut m = [0f32; 4];
            for v in &csw[a..z] {
                for k in 0..4 {
                    m[k] += v[k];
                }
            }
            let n = (z - a) as f32;
            let [cx, cy, w, h] = m.map(|v| v / n);
            [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, side: f32, score: f32) -> Face {
        Face {
            bbox: [x, 10.0, x + side, 10.0 + side],
            score,
            landmarks: [[0.0; 2]; 5],
        }
    }

    #[test]
    fn gaps_take_the_nearest_box_and_selection_works() {
        // Frames 0..6; faces on 1 (x=0) and 4 (x=100); 2 is closer to 1, 3 closer to 4.
        let mut det: Vec<Option<Vec<Face>>> = vec![Some(vec![]); 6];
        det[1] = Some(vec![face(0.0, 40.0, 0.99)]);
        det[4] = Some(vec![face(100.0, 40.0, 0.8), face(300.0, 20.0, 0.999)]);
        let t = plan_track(&det, &[true; 6], &TrackOptions::default()).unwrap();
        let x: Vec<i64> = t.frames.iter().map(|f| f.crop.x0).collect();
        assert_eq!(x, vec![0, 0, 0, 100, 100, 100]);
        assert_eq!((t.examined, t.detected), (6, 2));
        let by_score = TrackOptions {
            select: FaceSelect::Score,
            ..Default::default()
        };
        let t = plan_track(&det, &[true; 6], &by_score).unwrap();
        assert_eq!(t.frames[5].crop.x0, 300);
    }

    #[test]
    fn no_face_is_an_error_and_smoothing_averages() {
        let det: Vec<Option<Vec<Face>>> = vec![Some(vec![]); 3];
        let e = plan_track(&det, &[true; 3], &TrackOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no face found in any of the 3 frames examined"
        );
        let b = smooth(
            &[
                [0.0, 0.0, 10.0, 10.0],
                [6.0, 0.0, 16.0, 10.0],
                [0.0, 0.0, 10.0, 10.0],
            ],
            3,
        );
        assert!((b[1][0] - 2.0).abs() < 1e-6, "{b:?}");
        assert!((b[0][0] - 3.0).abs() < 1e-6, "{b:?}");
    }
}
