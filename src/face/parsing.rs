//! Face-region parsing (LaPa labels) from the detector's 5 landmarks, for Fasking.
//!
//! The reference runs a FaRL parser we cannot ship. Fasking only needs, per 16x16 patch,
//! whether eyes, brows, nose, mouth, hair, skin or background are present, so we draw a
//! canonical face layout (regions placed relative to the 5 landmarks of the common 112x112
//! alignment template) and map it into each crop with the similarity transform that best fits
//! the detected landmarks to the template's (least squares, Umeyama). Labels: 0 background,
//! 1 skin, 2/3 brows, 4/5 eyes, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair.

use crate::masking::ParsingMap;

/// The 5 landmarks (image-left eye, image-right eye, nose, left and right mouth corners) of
/// the 112x112 alignment template used across face recognition.
pub const TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// A 2-D similarity: `q = s R p + t`, stored as `[a, b, tx, ty]` with `sR = [[a, -b], [b, a]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    pub a: f32,
    pub b: f32,
    pub tx: f32,
    pub ty: f32,
}

impl Similarity {
    /// Least-squares similarity taking `from` points onto `to` points.
    pub fn fit(from: &[[f32; 2]], to: &[[f32; 2]]) -> Self {
        let n = from.len().min(to.len()).max(1) as f32;
        let mean = |p: &[[f32; 2]]| {
            let s = p.iter().fold([0f32; 2], |a, v| [a[0] + v[0], a[1] + v[1]]);
            [s[0] / n, s[1] / n]
        };
        let (mf, mt) = (mean(from), mean(to));
        let (mut sxx, mut sxy_a, mut sxy_b) = (0f32, 0f32, 0f32);
        for (p, q) in from.iter().zip(to) {
            let (px, py) = (p[0] - mf[0], p[1] - mf[1]);
            let (qx, qy) = (q[0] - mt[0], q[1] - mt[1]);
            sxx += px * px + py * py;
            sxy_a += px * qx + py * qy;
            sxy_b += px * qy - py * qx;
        }
        let (a, b) = if sxx > 0.0 {
            (sxy_a / sxx, sxy_b / sxx)
        } else {
            (1.0, 0.0)
        };
        Self {
            a,
            b,
            tx: mt[0] - (a * mf[0] - b * mf[1]),
            ty: mt[1] - (b * mf[0] + a * mf[1]),
        }
    }

    pub fn apply(&self, p: [f32; 2]) -> [f32; 2] {
        [
            self.a * p[0] - self.b * p[1] + self.tx,
            self.b * p[0] + self.a * p[1] + self.ty,
        ]
    }
}

fn in_ellipse(p: [f32; 2], c: [f32; 2], r: [f32; 2]) -> bool {
    let dx = (p[0] - c[0]) / r[0];
    let dy = (p[1] - c[1]) / r[1];
    dx * dx + dy * dy <= 1.0
}

/// The label of a point of the 112x112 template face.
fn template_label(p: [f32; 2]) -> u8 {
    let [le, re, nose, ml, mr] = TEMPLATE;
    let mouth_c = [(ml[0] + mr[0]) / 2.0, (ml[1] + mr[1]) / 2.0];
    let half_w = (mr[0] - ml[0]) / 2.0 + 2.0;
    // Mouth: upper lip, inner mouth, lower lip as stacked bands inside the lip ellipse.
    if in_ellipse(p, mouth_c, [half_w, 7.0]) {
        let dy = p[1] - mouth_c[1];
        return if dy < -1.2 {
            7
        } else if dy <= 1.2 {
            8
        } else {
            9
        };
    }
    if in_ellipse(p, le, [8.5, 4.5]) {
        return 4;
    }
    if in_ellipse(p, re, [8.5, 4.5]) {
        return 5;
    }
    if in_ellipse(p, [le[0], le[1] - 10.0], [11.0, 3.0]) {
        return 2;
    }
    if in_ellipse(p, [re[0], re[1] - 10.0], [11.0, 3.0]) {
        return 3;
    }
    // Nose: from between the eyes down to the tip, widening.
    let top = (le[1] + re[1]) / 2.0 + 2.0;
    if p[1] >= top && p[1] <= nose[1] + 5.0 {
        let f = (p[1] - top) / (nose[1] + 5.0 - top);
        if (p[0] - nose[0]).abs() <= 3.0 + 7.0 * f {
            return 6;
        }
    }
    if in_ellipse(p, [56.0, 66.0], [35.0, 50.0]) {
        return 1;
    }
    if in_ellipse(p, [56.0, 36.0], [44.0, 38.0]) && p[1] < 62.0 {
        return 10;
    }
    0
}

/// A `size` x `size` LaPa label map of a face crop whose 5 landmarks (crop pixels) are
/// `landmarks`.
pub fn parse_from_landmarks(landmarks: &[[f32; 2]; 5], size: usize) -> ParsingMap {
    // Crop pixel -> template point.
    let to_template = Similarity::fit(landmarks, &TEMPLATE);
    let mut labels = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let p = to_template.apply([x as f32 + 0.5, y as f32 + 0.5]);
            labels[y * size + x] = template_label(p);
        }
    }
    ParsingMap {
        width: size,
        height: size,
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_recovers_a_known_transform() {
        let t = Similarity {
            a: 1.5,
            b: 0.4,
            tx: 10.0,
            ty: -3.0,
        };
        let moved: Vec<[f32; 2]> = TEMPLATE.iter().map(|&p| t.apply(p)).collect();
        let f = Similarity::fit(&TEMPLATE, &moved);
        assert!(
            (f.a - 1.5).abs() < 1e-4 && (f.b - 0.4).abs() < 1e-4,
            "{f:?}"
        );
        assert!(
            (f.tx - 10.0).abs() < 1e-3 && (f.ty + 3.0).abs() < 1e-3,
            "{f:?}"
        );
    }

    #[test]
    fn regions_sit_on_their_landmarks() {
        // Landmarks of a crop twice the template size: each landmark pixel has its label.
        let lm = TEMPLATE.map(|p| [p[0] * 2.0, p[1] * 2.0]);
        let m = parse_from_landmarks(&lm, 224);
        let at = |p: [f32; 2]| m.labels[p[1] as usize * 224 + p[0] as usize];
        assert_eq!(at(lm[0]), 4);
        assert_eq!(at(lm[1]), 5);
        assert_eq!(at(lm[2]), 6);
        assert_eq!(at([(lm[3][0] + lm[4][0]) / 2.0, lm[3][1] - 6.0]), 7);
        assert_eq!(at([112.0, 20.0]), 10);
        assert_eq!(at([2.0, 220.0]), 0);
        assert_eq!(at([112.0, 160.0]), 1);
    }
}
