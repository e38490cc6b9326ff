//! Pretraining data preparation of one video (or frame folder): face crops of every frame in
//! `DATA/crop_images_DB/<rel>/NNNNN.jpg` and their LaPa parsing maps in
//! `DATA/face_parsing_images_DB/<rel>/NNNNN.npy` (`[size, size]` u8), the reference layout.
//! Both folders are written under temp names and renamed when complete.

use super::crop::crop_resize;
use super::detect::Detector;
use super::parsing::parse_from_landmarks;
use super::track::{detect_frames, plan_track, TrackOptions};
use crate::util::temp_path;
use crate::video::{open_input, Input};
use burn::tensor::backend::Backend;
use std::path::Path;

/// Crop and parse every frame of `input` into `data` under `rel`. Returns the frame count.
pub fn prepare_video<B: Backend>(
    input: &Input,
    rel: &Path,
    data: &Path,
    detector: &Detector<B>,
    track: &TrackOptions,
    size: usize,
    stop: &dyn Fn() -> bool,
) -> Result<usize, crate::face::crop_video::CropError> {
    let run = || -> Result<usize, String> {
        let name = input.path().display().to_string();
        let e = |err: crate::video::VideoError| err.to_string();
        let (mut reader, frames, _) = open_input(input, None).map_err(e)?;
        let wanted = vec![true; frames];
        let dets = detect_frames(reader.as_mut(), &wanted, detector, track, stop).map_err(e)?;
        drop(reader);
        let t = plan_track(&dets, &wanted, track).map_err(|msg| format!("{name}: {msg}"))?;
        // Landmarks in crop pixels of each frame: its own detection, else the nearest frame's.
        let own: Vec<Option<[[f32; 2]; 5]>> = t
            .frames
            .iter()
            .map(|f| {
                f.face
                    .map(|face| face.landmarks.map(|p| f.crop.to_crop(p, size)))
            })
            .collect();
        let with: Vec<usize> = (0..own.len()).filter(|&i| own[i].is_some()).collect();
        let crop_dir = data.join("crop_images_DB").join(rel);
        let parse_dir = data.join("face_parsing_images_DB").join(rel);
        let (tmp_c, tmp_p) = (temp_path(&crop_dir), temp_path(&parse_dir));
        for d in [&tmp_c, &tmp_p] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(|err| format!("{}: {err}", d.display()))?;
        }
        let (mut reader, _, _) = open_input(input, None).map_err(e)?;
        let result = (|| -> Result<usize, String> {
            let mut n = 0;
            for (i, f) in t.frames.iter().enumerate() {
                if stop() {
                    return Err("interrupted".into());
                }
                let Some(frame) = reader.next_frame().map_err(e)? else {
                    break;
                };
                let face = crop_resize(&frame, &f.crop, size);
                let p = tmp_c.join(format!("{:05}.jpg", f.index));
                let img = image::RgbImage::from_raw(size as u32, size as u32, face.data)
                    .ok_or("bad frame buffer")?;
                let mut buf = std::io::Cursor::new(Vec::new());
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
                    .encode_image(&img)
                    .map_err(|err| format!("{}: {err}", p.display()))?;
                std::fs::write(&p, buf.into_inner())
                    .map_err(|err| format!("{}: {err}", p.display()))?;
                let near = with
                    .iter()
                    .min_by_key(|&&j| (j as i64 - i as i64).unsigned_abs())
                    .and_then(|&j| own[j]);
                if let Some(lm) = own[i].or(near) {
                    let map = parse_from_landmarks(&lm, size);
                    let arr = ndarray::Array2::from_shape_vec((size, size), map.labels)
                        .map_err(|err| err.to_string())?;
                    let q = tmp_p.join(format!("{:05}.npy", f.index));
                    ndarray_npy::write_npy(&q, &arr)
                        .map_err(|err| format!("{}: {err}", q.display()))?;
                }
                n += 1;
            }
            Ok(n)
        })();
        let n = match result {
            Ok(n) if n > 0 => n,
            Ok(_) => Err(format!("{name}: no frame could be decoded"))?,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&tmp_c);
                let _ = std::fs::remove_dir_all(&tmp_p);
                return Err(err);
            }
        };
        for (tmp, dst) in [(&tmp_p, &parse_dir), (&tmp_c, &crop_dir)] {
            let _ = std::fs::remove_dir_all(dst);
            std::fs::rename(tmp, dst).map_err(|err| format!("{}: {err}", dst.display()))?;
        }
        Ok(n)
    };
    run().map_err(crate::face::crop_video::CropError::Prepare)
}
