//! Which frames make each clip: the reference's (marlin-pytorch 0.3.4 `extract_video`) windowing.
//!
//! With n frames (from the container), clip length T (16) and sample rate s:
//! - n <= T: all frames, padded to T by repeating the last one; one clip.
//! - T < n <= T*s: the first T frames; one clip. (The reference means to pad here when the
//!   decoder returns fewer than T frames, but its padding branch is dead code and the model then
//!   fails; we pad with the last frame.)
//! - n > T*s: every s-th frame; clip starts at range(0, n - T*s, stride*s) (end exclusive), each
//!   clip the T kept frames from its start.

/// A planned clip: source frame indices (ascending, repeats allowed for padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub frames: Vec<usize>,
    /// Whether frames missing at the end of the stream may be replaced by the last decoded
    /// frame (short videos) rather than dropping the clip (sliding windows, as the reference).
    pub pad_short: bool,
}

/// Clip windows for a video of `n` frames.
pub fn plan(n: usize, clip_frames: usize, sample_rate: usize, stride: usize) -> Vec<Window> {
    let t = clip_frames;
    let s = sample_rate.max(1);
    if n == 0 {
        return vec![];
    }
    if n <= t {
        let frames = (0..t).map(|i| i.min(n - 1)).collect();
        return vec![Window {
            frames,
            pad_short: true,
        }];
    }
    if n <= t * s {
        return vec![Window {
            frames: (0..t).collect(),
            pad_short: true,
        }];
    }
    let step = (stride * s).max(1);
    (0..n - t * s)
        .step_by(step)
        .map(|start| Window {
            frames: (0..t).map(|k| start + k * s).collect(),
            pad_short: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_follow_the_reference() {
        // (frames, expected clips) at sample_rate 2, stride 16.
        for (n, clips) in [
            (1, 1),
            (10, 1),
            (16, 1),
            (20, 1),
            (32, 1),
            (33, 1),
            (64, 1),
            (65, 2),
            (100, 3),
            (143, 4),
            (300, 9),
        ] {
            assert_eq!(plan(n, 16, 2, 16).len(), clips, "n = {n}");
        }
        assert!(plan(0, 16, 2, 16).is_empty());
    }

    #[test]
    fn window_contents() {
        let w = plan(10, 16, 2, 16);
        assert_eq!(w[0].frames[..10], (0..10).collect::<Vec<_>>()[..]);
        assert!(w[0].frames[10..].iter().all(|&f| f == 9));
        assert_eq!(plan(20, 16, 2, 16)[0].frames, (0..16).collect::<Vec<_>>());
        let w = plan(100, 16, 2, 16);
        assert_eq!(w[1].frames, (0..16).map(|k| 32 + 2 * k).collect::<Vec<_>>());
        // sample_rate 1, stride 8: overlapping windows.
        let w = plan(40, 16, 1, 8);
        assert_eq!(w.len(), 3);
        assert_eq!(w[2].frames[0], 16);
    }
}
