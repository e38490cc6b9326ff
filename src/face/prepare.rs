//! Pretraining data preparation of one video (or frame folder): face crops of every frame in
//! `DATA/crop_images_DB/<rel>/NNNNN.jpg` and their LaPa parsing maps ([`Parsing`]: the face mesh by default) in
//! `DATA/face_parsing_images_DB/<rel>/NNNNN.npy` (`[size, size]` u8), the reference layout.
//! Both folders are written under temp names and renamed when complete. With the mesh parser the
//! landmarks of every frame are found first and smoothed over the frames as the face boxes are
//! (`--smooth`), then the video is read a second time for the person masks and the maps.

use super::crop::crop_resize;
use super::crop_video::CropError;
use super::detect::Detector;
use super::parser::{smooth_landmarks, FaceInput, Parsing};
use super::track::{detect_frames, plan_track, TrackOptions};
use crate::masking::ParsingMap;
use crate::util::temp_path;
use crate::video::{open_input, Input};
use burn::tensor::backend::Backend;
use std::path::Path;

/// Frames cropped and parsed together.
const PARSE_BATCH: usize = 16;

/// What every frame goes through: detection, the face track, the crop's side and the parser.
pub struct FaceSteps<'a, B: Backend> {
    pub detector: &'a Detector<B>,
    pub track: &'a TrackOptions,
    pub parsing: &'a Parsing<B>,
    pub size: usize,
}

/// Crop and parse every frame of `input` into `data` under `rel`. Returns the frame count.
pub fn prepare_video<B: Backend>(
    input: &Input,
    rel: &Path,
    data: &Path,
    steps: &FaceSteps<B>,
    stop: &dyn Fn() -> bool,
) -> Result<usize, CropError> {
    let FaceSteps {
        detector,
        track,
        parsing,
        size,
    } = *steps;
    let name = input.path().display().to_string();
    // A file that cannot be written: its path and why.
    let write = |path: &Path, err: &dyn std::fmt::Display| CropError::Write {
        path: path.display().to_string(),
        msg: err.to_string(),
    };
    let run = || -> Result<usize, CropError> {
        let (mut reader, frames, _) = open_input(input, None)?;
        let wanted = vec![true; frames];
        let dets = detect_frames(reader.as_mut(), &wanted, detector, track, stop)?;
        drop(reader);
        let t = plan_track(&dets, &wanted, track).map_err(|e| CropError::Track {
            path: name.clone(),
            msg: e.to_string(),
        })?;
        let crop_dir = data.join("crop_images_DB").join(rel);
        let parse_dir = data.join("face_parsing_images_DB").join(rel);
        let (tmp_c, tmp_p) = (temp_path(&crop_dir), temp_path(&parse_dir));
        for d in [&tmp_c, &tmp_p] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(|err| write(d, &err))?;
        }
        let (mut reader, _, _) = open_input(input, None)?;
        let write_map = |index: usize, map: ParsingMap| -> Result<(), CropError> {
            let q = tmp_p.join(format!("{index:05}.npy"));
            let arr = ndarray::Array2::from_shape_vec((size, size), map.labels)
                .map_err(|err| write(&q, &err))?;
            ndarray_npy::write_npy(&q, &arr).map_err(|err| write(&q, &err))
        };
        let result = (|| -> Result<usize, CropError> {
            let mut n = 0;
            // Frames whose map is its own, and those that borrow the nearest one's.
            let (mut parsed, mut missing) = (Vec::new(), Vec::new());
            // The mesh parser's landmarks of each frame (None: no face in the crop).
            let mut tracked: Vec<Option<Vec<[f32; 3]>>> = Vec::new();
            for chunk in t.frames.chunks(PARSE_BATCH) {
                let mut frames = Vec::with_capacity(chunk.len());
                for f in chunk {
                    if stop() {
                        return Err(CropError::Interrupted);
                    }
                    let Some(frame) = reader.next_frame()? else {
                        break;
                    };
                    let face = crop_resize(&frame, &f.crop, size);
                    let p = tmp_c.join(format!("{:05}.jpg", f.index));
                    let img = image::RgbImage::from_raw(size as u32, size as u32, face.data)
                        .ok_or_else(|| write(&p, &"bad frame buffer"))?;
                    let mut buf = std::io::Cursor::new(Vec::new());
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
                        .encode_image(&img)
                        .map_err(|err| write(&p, &err))?;
                    std::fs::write(&p, buf.into_inner()).map_err(|err| write(&p, &err))?;
                    frames.push(frame);
                }
                let faces: Vec<FaceInput> = frames
                    .iter()
                    .zip(chunk)
                    .map(|(frame, f)| FaceInput {
                        frame,
                        crop: f.crop,
                        face: f.face,
                    })
                    .collect();
                match parsing {
                    // Landmarks now; maps once they are smoothed over the frames.
                    Parsing::Mesh(p) => tracked.extend(
                        p.track(&faces)
                            .into_iter()
                            .map(|(pts, face)| (face >= 0.5).then_some(pts)),
                    ),
                    Parsing::Template => {
                        for (f, map) in chunk.iter().zip(parsing.maps(&faces, size)) {
                            match map {
                                Some(map) => {
                                    write_map(f.index, map)?;
                                    parsed.push(f.index);
                                }
                                None => missing.push(f.index),
                            }
                        }
                    }
                }
                n += frames.len();
                if frames.len() < chunk.len() {
                    break;
                }
            }
            if let Parsing::Mesh(p) = parsing {
                // The landmarks smoothed as the boxes are (--smooth), then a second pass over
                // the frames for the person masks and the maps.
                let smoothed = smooth_landmarks(&tracked, track.smooth);
                let (mut reader, _, _) = open_input(input, None)?;
                for (chunk, points) in t.frames[..n]
                    .chunks(PARSE_BATCH)
                    .zip(smoothed.chunks(PARSE_BATCH))
                {
                    if stop() {
                        return Err(CropError::Interrupted);
                    }
                    let mut frames = Vec::with_capacity(chunk.len());
                    for _ in chunk {
                        let frame = reader.next_frame()?.ok_or_else(|| CropError::Track {
                            path: name.clone(),
                            msg: "fewer frames on the second read than the first".into(),
                        })?;
                        frames.push(frame);
                    }
                    let (mut faces, mut pts, mut index) = (Vec::new(), Vec::new(), Vec::new());
                    for ((frame, f), p) in frames.iter().zip(chunk).zip(points) {
                        match p {
                            Some(p) => {
                                faces.push(FaceInput {
                                    frame,
                                    crop: f.crop,
                                    face: f.face,
                                });
                                pts.push(p.as_slice());
                                index.push(f.index);
                            }
                            None => missing.push(f.index),
                        }
                    }
                    for (i, (map, _)) in index.into_iter().zip(p.label(&faces, &pts, size)) {
                        write_map(i, map)?;
                        parsed.push(i);
                    }
                }
            }
            missing.retain(|&i| i < n);
            for i in missing {
                let near = parsed
                    .iter()
                    .min_by_key(|&&j| (j as i64 - i as i64).unsigned_abs());
                if let Some(&j) = near {
                    let from = tmp_p.join(format!("{j:05}.npy"));
                    let to = tmp_p.join(format!("{i:05}.npy"));
                    std::fs::copy(&from, &to).map_err(|err| write(&to, &err))?;
                }
            }
            Ok(n)
        })();
        let n = match result {
            Ok(n) if n > 0 => n,
            Ok(_) => Err(CropError::Track {
                path: name.clone(),
                msg: "no frame could be decoded".into(),
            })?,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&tmp_c);
                let _ = std::fs::remove_dir_all(&tmp_p);
                return Err(err);
            }
        };
        for (tmp, dst) in [(&tmp_p, &parse_dir), (&tmp_c, &crop_dir)] {
            let _ = std::fs::remove_dir_all(dst);
            std::fs::rename(tmp, dst).map_err(|err| write(dst, &err))?;
        }
        Ok(n)
    };
    run()
}
