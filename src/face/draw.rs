//! Drawing detections on a frame (`marlin detect --draw`): box outlines and landmark dots.
//! Hand-written (two loops) rather than pulling in an imaging crate for rectangles.

use super::detect::Face;
use crate::video::Frame;

const BOX: [u8; 3] = [0, 255, 0];
const POINT: [u8; 3] = [255, 0, 0];

fn fill(f: &mut Frame, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
    let (w, h) = (f.width as i64, f.height as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            let o = ((y * w + x) * 3) as usize;
            f.data[o..o + 3].copy_from_slice(&c);
        }
    }
}

/// Draw each face's box (green) and 5 landmarks (red), lines scaled to the frame size.
pub fn draw_faces(f: &mut Frame, faces: &[Face]) {
    let t = (f.width.max(f.height) as i64 / 320).max(1);
    for face in faces {
        let [x1, y1, x2, y2] = face.bbox.map(|v| v.round() as i64);
        fill(f, x1 - t, y1 - t, x2 + t, y1 + t, BOX);
        fill(f, x1 - t, y2 - t, x2 + t, y2 + t, BOX);
        fill(f, x1 - t, y1 - t, x1 + t, y2 + t, BOX);
        fill(f, x2 - t, y1 - t, x2 + t, y2 + t, BOX);
        for p in face.landmarks {
            let (x, y) = (p[0].round() as i64, p[1].round() as i64);
            fill(f, x - 2 * t, y - 2 * t, x + 2 * t + 1, y + 2 * t + 1, POINT);
        }
    }
}
