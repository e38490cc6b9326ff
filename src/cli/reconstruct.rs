//! `marlin reconstruct`: show what masked pretraining sees and predicts for a clip: every frame
//! as original | masked | reconstruction, as a PNG grid and an MP4.

use super::run_on;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::face::parsing::parse_from_landmarks;
use marlin::face::track::plan_track;
use marlin::face::{crop_resize, DetectOptions, Detector, TrackOptions};
use marlin::masking::{make_mask, Grid, ParsingMap, RngDraws, Strategy};
use marlin::model::weights::StateDict;
use marlin::model::{Marlin, MarlinConfig, MaskIndices, Part};
use marlin::train::data::ClipSettings;
use marlin::train::run::{sample_image, save_png};
use marlin::video::writer::VideoWriter;
use marlin::video::{self, Frame};
use marlin::video::{open_input, Input};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ReconstructArgs {
    /// A face video (or frame folder); with --crop-face, any video with a face.
    pub video: PathBuf,
    /// A full checkpoint (encoder + decoder). Without it (and without --model) only the mask
    /// is drawn.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A released model: its full weights are downloaded on first use.
    #[arg(long)]
    pub model: Option<String>,
    /// A custom config (YAML) for --weights.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "fasking", value_parser = super::names::<Strategy>(&Strategy::NAMES))]
    pub strategy: Strategy,
    #[arg(long, default_value_t = 0.9)]
    pub mask_ratio: f64,
    /// First frame of the clip.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    #[arg(long, default_value_t = 2)]
    pub sample_rate: usize,
    /// Seed of the mask's random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Detect and crop the face first.
    #[arg(long)]
    pub crop_face: bool,
    /// Output folder: <name>_reconstruction.png and .mp4.
    #[arg(long, short)]
    pub out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

struct Job {
    args: ReconstructArgs,
    cfg: MarlinConfig,
    weights: Option<PathBuf>,
}

impl BackendTask for Job {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.args;
        let cfg = &self.cfg;
        let (t, size) = (cfg.clip_frames, cfg.img_size);
        let input = Input::from_path(&a.video);
        let e = |err: video::VideoError| err.to_string();
        let (mut reader, n, _) = open_input(&input, None).map_err(e)?;
        let picks: Vec<usize> = (0..t).map(|i| a.start + i * a.sample_rate.max(1)).collect();
        let last = *picks.last().unwrap_or(&0);
        if n > 0 && last >= n {
            return Err(format!(
                "{}: {n} frames; a clip of {t} frames from {} at rate {} needs {}",
                a.video.display(),
                a.start,
                a.sample_rate,
                last + 1
            ));
        }
        let raw: Vec<Frame> = video::clip::read_indices(reader.as_mut(), &picks)
            .map_err(e)?
            .into_iter()
            .map(|f| (*f).clone())
            .collect();
        if raw.len() < picks.len() {
            return Err(format!(
                "{}: ended at frame {}",
                a.video.display(),
                picks[raw.len()]
            ));
        }
        let det =
            Detector::<B>::new(&device, DetectOptions::default()).map_err(|e| e.to_string())?;
        let frames: Vec<Frame> = if a.crop_face {
            let refs: Vec<&Frame> = raw.iter().collect();
            let dets: Vec<Option<Vec<marlin::face::Face>>> =
                det.detect(&refs).into_iter().map(Some).collect();
            let track = plan_track(&dets, &vec![true; raw.len()], &TrackOptions::default())
                .map_err(|m| format!("{}: {m}", a.video.display()))?;
            raw.iter()
                .zip(&track.frames)
                .map(|(f, tf)| crop_resize(f, &tf.crop, size))
                .collect()
        } else {
            raw.iter()
                .map(|f| video::resize_frame(f, size, size))
                .collect()
        };
        // Parsing maps of each tubelet's first frame, from the detector's landmarks.
        let tub = cfg.tubelet_size;
        let firsts: Vec<&Frame> = frames.iter().step_by(tub).collect();
        let parsing: Vec<Option<ParsingMap>> = det
            .detect(&firsts)
            .into_iter()
            .map(|faces| {
                faces
                    .iter()
                    .max_by(|x, y| x.area().total_cmp(&y.area()))
                    .map(|f| parse_from_landmarks(&f.landmarks, size))
            })
            .collect();
        let g = cfg.img_size / cfg.patch_size;
        let grid = Grid {
            tubelets: t / tub,
            grid_h: g,
            grid_w: g,
            patch: cfg.patch_size,
        };
        let refs: Vec<Option<&ParsingMap>> = parsing.iter().map(Option::as_ref).collect();
        let visible = make_mask(
            a.strategy,
            a.mask_ratio,
            &refs,
            &grid,
            &mut RngDraws::new(a.seed),
        );
        let plane = t * size * size;
        let mut clip = vec![0f32; 3 * plane];
        for (ti, f) in frames.iter().enumerate() {
            for (p, px) in f.data.chunks_exact(3).enumerate() {
                let o = ti * size * size + p;
                for c in 0..3 {
                    clip[c * plane + o] = px[c] as f32 / 255.0;
                }
            }
        }
        let pred: Option<Vec<f32>> = match &self.weights {
            Some(w) => {
                let sd = StateDict::load(w).map_err(|e| e.to_string())?;
                if !sd.tensors.keys().any(|k| k.starts_with("decoder.")) {
                    return Err(format!(
                        "{}: encoder-only weights; reconstruction needs a full checkpoint (`marlin download NAME --full`)",
                        w.display()
                    ));
                }
                let (m, _) = Marlin::<B>::from_state_dict(
                    cfg,
                    &sd,
                    &[Part::Encoder, Part::Decoder],
                    &device,
                )
                .map_err(|e| e.to_string())?;
                let x = Tensor::<B, 5>::from_data(
                    TensorData::new(clip.clone(), [1, 3, t, size, size]),
                    &device,
                );
                let idx = MaskIndices::from_bools(&visible, 1).map_err(|e| e.to_string())?;
                let y = m.forward_indices(x, &idx).map_err(|e| e.to_string())?;
                Some(
                    y.into_data()
                        .convert::<f32>()
                        .into_vec::<f32>()
                        .unwrap_or_default(),
                )
            }
            None => None,
        };
        let settings = ClipSettings {
            clip_frames: t,
            sample_rate: a.sample_rate,
            img_size: size,
            grid,
            tubelet: tub,
            strategy: a.strategy,
            mask_ratio: a.mask_ratio,
        };
        let panels: Vec<image::RgbImage> = (0..t)
            .map(|f| sample_image(&clip, &visible, pred.as_deref(), &settings, f))
            .collect();
        let (w, h) = (panels[0].width(), panels[0].height());
        let mut grid_img = image::RgbImage::new(w, h * t as u32);
        for (i, p) in panels.iter().enumerate() {
            image::imageops::replace(&mut grid_img, p, 0, (i as u32 * h) as i64);
        }
        let stem = a
            .video
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or("clip".into());
        let png = a.out.join(format!("{stem}_reconstruction.png"));
        save_png(&grid_img, &png)?;
        let fps = match &input {
            Input::Video(v) => video::probe(v).map(|i| i.fps).unwrap_or(25.0),
            Input::Frames(_) => 25.0,
        } / a.sample_rate.max(1) as f64;
        let mp4 = a.out.join(format!("{stem}_reconstruction.mp4"));
        let mut wr = VideoWriter::create(&mp4, w as usize, h as usize, fps).map_err(e)?;
        for p in panels {
            wr.write(&Frame {
                width: w as usize,
                height: h as usize,
                data: p.into_raw(),
            })
            .map_err(e)?;
        }
        wr.finish().map_err(e)?;
        let shown = visible.iter().filter(|&&v| v).count();
        outln!(
            "{}: {shown} of {} tokens visible ({:?}, ratio {}); {}{}",
            a.video.display(),
            visible.len(),
            a.strategy,
            a.mask_ratio,
            png.display(),
            if pred.is_none() {
                " (no weights: mask only)"
            } else {
                ""
            }
        );
        Ok(0)
    }
}

pub fn run(args: ReconstructArgs) -> Result<i32, String> {
    if !(0.0..1.0).contains(&args.mask_ratio) {
        return Err("--mask-ratio must be in [0, 1)".into());
    }
    let cfg = match (&args.config, &args.model) {
        (Some(p), _) => MarlinConfig::from_yaml_file(p).map_err(|e| e.to_string())?,
        (None, Some(m)) => MarlinConfig::from_name(m).map_err(|e| e.to_string())?,
        (None, None) => {
            MarlinConfig::from_name("marlin_vit_base_ytf").map_err(|e| e.to_string())?
        }
    };
    let weights = match (&args.weights, &args.model) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(m)) => Some(marlin::hub::fetch(m, true, true).map_err(|e| e.to_string())?),
        (None, None) => None,
    };
    if !args.video.exists() {
        return Err(video::VideoError::Missing(args.video.display().to_string()).to_string());
    }
    let device = args.device;
    run_on(device, Job { args, cfg, weights })?
}
