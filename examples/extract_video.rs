//! One video (or frame folder) to MARLIN features with the library, as marlin-pytorch's
//! `model.extract_video(path)`.
//!
//!     cargo run --release --example extract_video -- VIDEO [CONFIG.yaml WEIGHTS]
//!
//! Without CONFIG and WEIGHTS it uses the released `marlin_vit_base_ytf` encoder (downloaded
//! once into the cache). With no argument at all it runs on a test video of this repository
//! with its small test model.

use marlin::backend::{Cpu, DeviceSpec};
use marlin::extract::ExtractOptions;
use marlin::kernels::Precision;
use marlin::{Marlin, MarlinConfig};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/video");
    let (video, cfg, weights) = match &args[..] {
        [] => (
            fixtures.join("h264_100.mp4"),
            MarlinConfig::from_yaml_file(&fixtures.join("tiny224.yaml"))?,
            fixtures.join("tiny224.pt"),
        ),
        [video] => (
            video.clone(),
            MarlinConfig::from_name("marlin_vit_base_ytf")?,
            marlin::hub::fetch("marlin_vit_base_ytf", false, true)?,
        ),
        [video, cfg, weights, ..] => (
            video.clone(),
            MarlinConfig::from_yaml_file(cfg)?,
            weights.clone(),
        ),
        _ => {
            eprintln!("usage: extract_video [VIDEO [CONFIG.yaml WEIGHTS]]");
            std::process::exit(2);
        }
    };
    let (model, _) = Marlin::<Cpu>::load_file(&cfg, &weights, &[], &Default::default())?;
    // Extraction on the engine's schedule, as `marlin extract` runs it.
    let (model, _) = marlin::engine::attach(model, DeviceSpec::Cpu, Precision::F32)?;
    // The reference's defaults: every 2nd frame, windows of 16 kept frames, 16 apart.
    let (features, stats) = model.extract_video(&video, &ExtractOptions::default())?;
    println!(
        "{}: {} frames, {} windows -> features {:?}",
        video.display(),
        stats.frames,
        stats.clips,
        features.shape()
    );
    Ok(())
}
