//! The reference's face crop: a square of side max(w, h) around the box centre, zero padding
//! outside the frame, resized bilinearly (OpenCV's `INTER_LINEAR` sampling, which
//! `marlin-pytorch` uses).

use crate::video::Frame;

/// A square crop in frame pixels: columns `x0..x0 + side`, rows `y0..y0 + side`; may extend
/// past the frame (zero padding there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    pub x0: i64,
    pub y0: i64,
    pub side: i64,
}

impl CropBox {
    /// The reference's square for a face box `[x1, y1, x2, y2]`: centre
    /// `(int((x1+x2)/2), int((y1+y2)/2))`, half side `int(max(w, h) / 2)`; `margin` enlarges the
    /// side by that fraction (0.2 = 20% larger, 0 = the reference).
    pub fn around(b: [f32; 4], margin: f32) -> Self {
        let cx = ((b[0] + b[2]) / 2.0).trunc() as i64;
        let cy = ((b[1] + b[3]) / 2.0).trunc() as i64;
        let half =
            ((b[2] - b[0]).abs().max((b[3] - b[1]).abs()) / 2.0 * (1.0 + margin)).trunc() as i64;
        let half = half.max(1);
        Self {
            x0: cx - half,
            y0: cy - half,
            side: 2 * half,
        }
    }

    /// Map a point of the frame into a `size` x `size` crop made from this box.
    pub fn to_crop(&self, p: [f32; 2], size: usize) -> [f32; 2] {
        let s = size as f32 / self.side as f32;
        [(p[0] - self.x0 as f32) * s, (p[1] - self.y0 as f32) * s]
    }
}

/// Cut `bx` out of `f` (zeros outside the frame) and resize it to `size` x `size`.
pub fn crop_resize(f: &Frame, bx: &CropBox, size: usize) -> Frame {
    let side = bx.side.max(1) as usize;
    let scale = side as f32 / size as f32;
    // Source positions and weights along one axis (OpenCV's INTER_LINEAR rule).
    let taps: Vec<(usize, f32)> = (0..size)
        .map(|d| {
            let fx = (d as f32 + 0.5) * scale - 0.5;
            let mut s = fx.floor();
            let mut w = fx - s;
            if s < 0.0 {
                s = 0.0;
                w = 0.0;
            }
            if s as usize >= side - 1 {
                s = (side - 1) as f32;
                w = 0.0;
            }
            (s as usize, w)
        })
        .collect();
    let (fw, fh) = (f.width as i64, f.height as i64);
    let px = |cx: usize, cy: usize, c: usize| -> f32 {
        let (x, y) = (bx.x0 + cx as i64, bx.y0 + cy as i64);
        if x < 0 || y < 0 || x >= fw || y >= fh {
            0.0
        } else {
            f.data[((y * fw + x) * 3) as usize + c] as f32
        }
    };
    let mut data = vec![0u8; size * size * 3];
    for (dy, &(sy, wy)) in taps.iter().enumerate() {
        let sy1 = (sy + 1).min(side - 1);
        for (dx, &(sx, wx)) in taps.iter().enumerate() {
            let sx1 = (sx + 1).min(side - 1);
            for c in 0..3 {
                let top = px(sx, sy, c) * (1.0 - wx) + px(sx1, sy, c) * wx;
                let bot = px(sx, sy1, c) * (1.0 - wx) + px(sx1, sy1, c) * wx;
                let v = top * (1.0 - wy) + bot * wy;
                data[(dy * size + dx) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    Frame {
        width: size,
        height: size,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_around_box_as_reference() {
        // 40 wide, 60 tall box centred at (50, 70): side 60.
        let b = CropBox::around([30.0, 40.0, 70.0, 100.0], 0.0);
        assert_eq!(
            b,
            CropBox {
                x0: 20,
                y0: 40,
                side: 60
            }
        );
        let m = CropBox::around([30.0, 40.0, 70.0, 100.0], 0.5);
        assert_eq!(m.side, 90);
        assert_eq!(b.to_crop([20.0, 40.0], 224), [0.0, 0.0]);
    }

    #[test]
    fn crop_pads_with_zeros_and_keeps_inside_pixels() {
        // 4x4 frame of value 200; a crop half outside the frame.
        let f = Frame {
            width: 4,
            height: 4,
            data: vec![200; 48],
        };
        let same = crop_resize(
            &f,
            &CropBox {
                x0: 0,
                y0: 0,
                side: 4,
            },
            4,
        );
        assert_eq!(same.data, f.data);
        let half = crop_resize(
            &f,
            &CropBox {
                x0: -4,
                y0: 0,
                side: 8,
            },
            8,
        );
        // Left half zeros, right half the frame.
        assert_eq!(half.data[0], 0);
        assert_eq!(half.data[(3 * 8 + 7) * 3], 200);
    }
}
