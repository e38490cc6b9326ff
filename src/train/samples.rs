//! The epoch pictures of a pretraining run: ground truth | masked | reconstruction of a frame.

use super::data::ClipSettings;
use super::TrainError;
use crate::util::write_atomic;
use std::path::Path;

/// Ground truth | masked | reconstruction of frame `frame` of a clip, as an RGB image
/// `[H, 3W]` (`[H, 2W]` without a prediction). `pred` is `[N_masked, 3 * tubelet * patch^2]`
/// in (c, pt, ph, pw) order for the masked tokens in ascending order; masked patches show
/// grey in the middle panel.
pub fn sample_image(
    clip: &[f32],
    visible: &[bool],
    pred: Option<&[f32]>,
    s: &ClipSettings,
    frame: usize,
) -> image::RgbImage {
    let (size, p, t) = (s.img_size, s.grid.patch, s.clip_frames);
    let plane = t * size * size;
    let (gw, per) = (s.grid.grid_w, s.grid.grid_h * s.grid.grid_w);
    let pd = 3 * s.tubelet * p * p;
    let (tube, pt) = (frame / s.tubelet, frame % s.tubelet);
    let panels = if pred.is_some() { 3 } else { 2 };
    let mut img = image::RgbImage::new((panels * size) as u32, size as u32);
    // Row of each masked token in `pred`.
    let mut row = vec![usize::MAX; visible.len()];
    let mut k = 0;
    for (i, &v) in visible.iter().enumerate() {
        if !v {
            row[i] = k;
            k += 1;
        }
    }
    let px = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    for y in 0..size {
        for x in 0..size {
            let tok = tube * per + (y / p) * gw + x / p;
            let (py, pxx) = (y % p, x % p);
            let (mut gt, mut masked, mut rec) = ([0u8; 3], [0u8; 3], [0u8; 3]);
            for c in 0..3 {
                let v = clip[c * plane + frame * size * size + y * size + x];
                gt[c] = px(v);
                if visible[tok] {
                    masked[c] = px(v);
                    rec[c] = px(v);
                } else {
                    masked[c] = 128;
                    let off = row[tok] * pd + c * s.tubelet * p * p + pt * p * p + py * p + pxx;
                    rec[c] = pred.and_then(|q| q.get(off)).copied().map(px).unwrap_or(0);
                }
            }
            img.put_pixel(x as u32, y as u32, image::Rgb(gt));
            img.put_pixel((size + x) as u32, y as u32, image::Rgb(masked));
            if panels == 3 {
                img.put_pixel((2 * size + x) as u32, y as u32, image::Rgb(rec));
            }
        }
    }
    img
}

/// Epoch samples of small models (a 32 px smoke config) are enlarged to at least this many
/// pixels a side, so they can be looked at.
pub(super) const SAMPLE_MIN_SIDE: u32 = 128;

/// `img` enlarged by the smallest whole factor (nearest neighbour: every pixel stays a
/// block of one colour) that makes its shorter side at least `min_side`; as is when it is.
pub fn enlarge_small(img: &image::RgbImage, min_side: u32) -> image::RgbImage {
    let side = img.width().min(img.height()).max(1);
    let k = min_side.div_ceil(side);
    if k <= 1 {
        return img.clone();
    }
    image::imageops::resize(
        img,
        img.width() * k,
        img.height() * k,
        image::imageops::FilterType::Nearest,
    )
}

pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<(), TrainError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    write_atomic(path, buf.get_ref())
        .map_err(|e| TrainError::Run(format!("{}: {e}", path.display())))
}
