//! One clip from a video: which frames (the reference's temporal sampling), reading them, and
//! packing them as the model's input. Used by fine-tuning, pretraining and reconstruction;
//! feature extraction's sliding windows are in [`super::windows`].

use super::{Frame, FrameReader, VideoError};
use rand::{rngs::StdRng, RngExt};
use std::sync::Arc;

/// One clip ready for the model: `[3, T, H, W]` float32 in [0, 1].
#[derive(Debug, Clone)]
pub struct ClipData {
    pub data: Vec<f32>,
}

/// The `t` frame indices of one clip of an `n`-frame video: `sample_rate` apart; a video too
/// short for that takes the largest rate that fits (at least 1), and one shorter than `t`
/// repeats its last frame. The start is drawn from `rng`, or centred without one.
pub fn sample_indices(
    n: usize,
    t: usize,
    sample_rate: usize,
    rng: Option<&mut StdRng>,
) -> Vec<usize> {
    let rate = if n <= t {
        1
    } else if n <= t * sample_rate {
        (n / t).max(1)
    } else {
        sample_rate
    };
    let span = (t - 1) * rate + 1;
    let room = n.saturating_sub(span);
    let start = match rng {
        Some(r) if room > 0 => r.random_range(0..=room),
        _ => room / 2,
    };
    (0..t)
        .map(|i| (start + i * rate).min(n.saturating_sub(1)))
        .collect()
}

/// Decode the frames at `indices` (ascending, repeats allowed) from the start of `reader`,
/// skipping the others. Returns fewer frames when the stream ends first.
pub fn read_indices(
    reader: &mut dyn FrameReader,
    indices: &[usize],
) -> Result<Vec<Arc<Frame>>, VideoError> {
    let mut out: Vec<Arc<Frame>> = Vec::with_capacity(indices.len());
    let mut next = 0usize; // index of the frame the reader gives next
    for &i in indices {
        if let Some(last) = out.last().filter(|_| i + 1 == next) {
            out.push(last.clone()); // the same frame again
            continue;
        }
        while next < i {
            if !reader.skip_frame()? {
                return Ok(out);
            }
            next += 1;
        }
        match reader.next_frame()? {
            Some(f) => out.push(Arc::new(f)),
            None => return Ok(out),
        }
        next += 1;
    }
    Ok(out)
}

/// Frames `[H, W, 3]` u8 -> clip `[3, T, H, W]` f32 / 255.
pub fn to_clip(frames: &[Arc<Frame>]) -> ClipData {
    let t = frames.len();
    let (h, w) = (frames[0].height, frames[0].width);
    let mut data = vec![0f32; 3 * t * h * w];
    let plane = t * h * w;
    for (ti, f) in frames.iter().enumerate() {
        for (p, px) in f.data.chunks_exact(3).enumerate() {
            let o = ti * h * w + p;
            data[o] = px[0] as f32 / 255.0;
            data[plane + o] = px[1] as f32 / 255.0;
            data[2 * plane + o] = px[2] as f32 / 255.0;
        }
    }
    ClipData { data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn short_videos_lower_the_rate_then_repeat_the_last_frame() {
        // Long enough: rate 2, centred.
        assert_eq!(sample_indices(100, 4, 2, None), vec![46, 48, 50, 52]);
        // 6 frames for 4 at rate 2: rate 1.
        assert_eq!(sample_indices(6, 4, 2, None), vec![1, 2, 3, 4]);
        // Shorter than the clip: the last frame repeats.
        assert_eq!(sample_indices(3, 4, 2, None), vec![0, 1, 2, 2]);
        // A drawn start stays inside the video.
        let mut r = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let v = sample_indices(40, 16, 2, Some(&mut r));
            assert!(
                v[15] < 40 && v.windows(2).all(|w| w[1] == w[0] + 2),
                "{v:?}"
            );
        }
    }

    struct Numbered(usize, usize);
    impl FrameReader for Numbered {
        fn next_frame(&mut self) -> Result<Option<Frame>, VideoError> {
            if self.0 >= self.1 {
                return Ok(None);
            }
            self.0 += 1;
            Ok(Some(Frame {
                width: 1,
                height: 1,
                data: vec![self.0 as u8 - 1; 3],
            }))
        }
        fn skip_frame(&mut self) -> Result<bool, VideoError> {
            Ok(self.next_frame()?.is_some())
        }
    }

    #[test]
    fn reads_the_chosen_frames_and_stops_at_the_end() {
        let got = |idx: &[usize]| -> Vec<u8> {
            read_indices(&mut Numbered(0, 5), idx)
                .unwrap()
                .iter()
                .map(|f| f.data[0])
                .collect()
        };
        assert_eq!(got(&[1, 3, 4]), vec![1, 3, 4]);
        assert_eq!(got(&[0, 2, 2, 4]), vec![0, 2, 2, 4]);
        assert_eq!(got(&[3, 7, 9]), vec![3]);
    }
}
