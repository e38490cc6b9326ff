//! A folder of videos in the wild to `.npy` features with the library: inputs found as
//! `marlin extract` finds them, the face detected, tracked and cropped first (`--crop-face`),
//! clips batched across videos, existing outputs skipped (a rerun resumes), failures listed.
//!
//!     cargo run --release --example extract_folder -- IN_DIR OUT_DIR [CONFIG.yaml WEIGHTS]
//!
//! With no argument it runs on `assets/` (the bundled sample face video) with this
//! repository's small test model, writing to a temp folder.

use marlin::backend::{Cpu, DeviceSpec};
use marlin::extract::batch::{extract_to_npy, write_failures, BatchOptions, FaceCrop};
use marlin::extract::inputs::{discover, DiscoverOptions};
use marlin::face::{DetectOptions, Detector, TrackOptions};
use marlin::kernels::Precision;
use marlin::{Marlin, MarlinConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures/video");
    let (input, out) = match &args[..] {
        [input, out, ..] => (input.clone(), out.clone()),
        _ => (
            root.join("assets"),
            std::env::temp_dir().join("marlin-example-features"),
        ),
    };
    let (cfg, weights) = match &args[..] {
        [_, _, cfg, weights, ..] => (MarlinConfig::from_yaml_file(cfg)?, weights.clone()),
        [_, _] => (
            MarlinConfig::from_name("marlin_vit_base_ytf")?,
            marlin::hub::fetch("marlin_vit_base_ytf", false, true)?,
        ),
        _ => (
            MarlinConfig::from_yaml_file(&fixtures.join("tiny224.yaml"))?,
            fixtures.join("tiny224.pt"),
        ),
    };
    let device = Default::default();
    let (model, _) = Marlin::<Cpu>::load_file(&cfg, &weights, &[], &device)?;
    // Extraction on the engine's schedule, as `marlin extract` runs it.
    let (model, _) = marlin::engine::attach(model, DeviceSpec::Cpu, Precision::F32)?;
    let faces = FaceCrop {
        detector: Detector::<Cpu>::new(&device, DetectOptions::default())?,
        track: TrackOptions::default(),
    };
    let found = discover(&[input], &DiscoverOptions::new(&out))?;
    let stop = AtomicBool::new(false); // set it from a Ctrl-C handler to stop after a batch
    let summary = extract_to_npy(
        &model,
        &found.items,
        &BatchOptions::default(),
        Some(&faces),
        &stop,
        &mut |p| {
            eprintln!(
                "{}/{} inputs, {:.1} clips/s",
                p.done,
                p.total,
                p.clips_per_second()
            )
        },
    )?;
    let mut failures = found.failures;
    failures.extend(summary.failures);
    write_failures(&out, &failures)?;
    println!(
        "{} written, {} skipped (already there), {} failed, into {}",
        summary.written,
        summary.skipped,
        failures.len(),
        out.display()
    );
    for f in &failures {
        eprintln!("failed: {}", f.error);
    }
    Ok(())
}
