//! `marlin reconstruct`: show what masked pretraining sees and predicts for a clip: every frame
//! as original | masked | reconstruction, as a PNG grid and an MP4.

use super::run_on;
use burn::tensor::backend::Backend;
use clap::Args;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::face::parser::ParserKind;
use marlin::masking::Strategy;
use marlin::model::weights::StateDict;
use marlin::model::{Marlin, MarlinConfig, Part};
use marlin::train::reconstruct::{reconstruct, ReconstructOptions};
use marlin::train::samples::save_png;
use marlin::video;
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
    /// Face parser of the Fasking masks: mesh (468-point face mesh + person mask) or template
    /// (a layout fitted to the detector's 5 points).
    #[arg(long, default_value = "mesh", value_parser = super::names::<ParserKind>(&ParserKind::NAMES))]
    pub parser: ParserKind,
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
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
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
        let model = match &self.weights {
            Some(w) => {
                let sd = StateDict::load(w).map_err(|e| e.to_string())?;
                if !sd.tensors.keys().any(|k| k.starts_with("decoder.")) {
                    return Err(format!(
                        "{}: encoder-only weights; reconstruction needs a full checkpoint (`marlin download NAME --full`)",
                        w.display()
                    ));
                }
                let parts = [Part::Encoder, Part::Decoder];
                let (m, _) = Marlin::<B>::from_state_dict(&self.cfg, &sd, &parts, &device)
                    .map_err(|e| e.to_string())?;
                Some(m)
            }
            None => None,
        };
        let opts = ReconstructOptions {
            strategy: a.strategy,
            mask_ratio: a.mask_ratio,
            start: a.start,
            sample_rate: a.sample_rate,
            seed: a.seed,
            crop_face: a.crop_face,
            parser: a.parser,
        };
        let r = reconstruct(&a.video, &self.cfg, model.as_ref(), &opts, &device)
            .map_err(|e| e.to_string())?;
        let stem = a
            .video
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or("clip".into());
        let png = a.out.join(format!("{stem}_reconstruction.png"));
        save_png(&r.grid(), &png).map_err(|e| e.to_string())?;
        let mp4 = a.out.join(format!("{stem}_reconstruction.mp4"));
        r.save_mp4(&mp4).map_err(|e| e.to_string())?;
        let shown = r.visible.iter().filter(|&&v| v).count();
        outln!(
            "{}: {shown} of {} tokens visible ({:?}, ratio {}); {}{}",
            a.video.display(),
            r.visible.len(),
            a.strategy,
            a.mask_ratio,
            png.display(),
            if r.predicted {
                ""
            } else {
                " (no weights: mask only)"
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
