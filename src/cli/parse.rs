//! `marlin parse`: look at a face's LaPa label map and the Fasking mask it gives.

use super::face::save_png;
use super::run_on;
use burn::tensor::backend::Backend;
use clap::Args;
use marlin::backend::{BackendTask, DeviceSpec};
use marlin::face::parse_view::{parse_frame, ParseOptions};
use marlin::face::parser::{ParserKind, Parsing};
use marlin::face::{DetectOptions, Detector};
use marlin::util::write_npy_atomic;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ParseArgs {
    /// An image, a video file or a frame folder.
    pub input: PathBuf,
    /// A PNG: per parser a row of crop | labels over the crop | Fasking mask of the tubelet
    /// starting at --frame.
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// The label map of the first parser as a .npy (`[size, size]` u8, LaPa labels).
    #[arg(long)]
    pub save_map: Option<PathBuf>,
    /// The face crop the maps are made for, as a PNG.
    #[arg(long)]
    pub save_crop: Option<PathBuf>,
    /// The frame of a video or frame folder.
    #[arg(long, default_value_t = 0)]
    pub frame: usize,
    /// mesh (468-point face mesh + person mask), template (5-point layout), or both (one row
    /// each, mesh first).
    #[arg(long, default_value = "mesh", value_parser = ["mesh", "template", "both"])]
    pub parser: String,
    /// Side of the crop and the map.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Enlarge the square crop by this fraction of its side (0: the reference's crop).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f32,
    /// Mask ratio of the pictured Fasking mask.
    #[arg(long, default_value_t = 0.9)]
    pub mask_ratio: f64,
    /// cpu, cuda[:N], vulkan[:N] or metal (GPUs need a build with that cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

struct ParseJob(ParseArgs);

impl BackendTask for ParseJob {
    type Output = Result<i32, String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let a = &self.0;
        let det =
            Detector::<B>::new(&device, DetectOptions::default()).map_err(|e| e.to_string())?;
        let kinds = match a.parser.as_str() {
            "both" => vec![ParserKind::Mesh, ParserKind::Template],
            "template" => vec![ParserKind::Template],
            _ => vec![ParserKind::Mesh],
        };
        let parsers = kinds
            .iter()
            .map(|&k| Parsing::<B>::new(k, &device).map(|p| (k, p)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let refs: Vec<(ParserKind, &Parsing<B>)> = parsers.iter().map(|(k, p)| (*k, p)).collect();
        let opts = ParseOptions {
            frame: a.frame,
            size: a.size,
            margin: a.margin,
            mask_ratio: a.mask_ratio,
            ..Default::default()
        };
        let parsed = parse_frame(&a.input, &det, &refs, &opts).map_err(|e| e.to_string())?;
        for (kind, map) in &parsed.maps {
            let counts = map.as_ref().map(|m| {
                let mut c = [0usize; 11];
                for &l in &m.labels {
                    c[(l as usize).min(10)] += 1;
                }
                c
            });
            match counts {
                Some(c) => outln!(
                    "{} frame {} ({kind:?}): pixels per label 0..10: {c:?}",
                    a.input.display(),
                    a.frame
                ),
                None => outln!(
                    "{} frame {} ({kind:?}): no face in the crop",
                    a.input.display(),
                    a.frame
                ),
            }
        }
        if let Some(out) = &a.draw {
            save_png(&parsed.picture(&opts), out)?;
        }
        if let Some(out) = &a.save_crop {
            save_png(&parsed.crop, out)?;
        }
        if let Some(out) = &a.save_map {
            let map = parsed.maps[0]
                .1
                .as_ref()
                .ok_or_else(|| format!("{}: no label map to save", a.input.display()))?;
            let arr = ndarray::Array2::from_shape_vec((map.height, map.width), map.labels.clone())
                .map_err(|e| e.to_string())?;
            write_npy_atomic(out, &arr).map_err(|e| format!("{}: {e}", out.display()))?;
        }
        Ok(0)
    }
}

/// `marlin parse`.
pub fn run(args: ParseArgs) -> Result<i32, String> {
    if !(0.0..1.0).contains(&args.mask_ratio) {
        return Err("--mask-ratio must be in [0, 1)".into());
    }
    if args.size < 16 {
        return Err("--size must be at least 16".into());
    }
    run_on(args.device, ParseJob(args))?
}
