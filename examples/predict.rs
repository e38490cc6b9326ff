//! A trained classifier (the folder `marlin probe` or `marlin finetune` writes) applied to
//! feature files or videos with the library.
//!
//!     cargo run --release --example predict -- CLASSIFIER_DIR FILE.npy|VIDEO...
//!
//! A probe predicting on videos needs the model that made its features: this example uses the
//! released `marlin_vit_base_ytf` encoder for that (see `examples/extract_video.rs`).

use marlin::backend::Cpu;
use marlin::probe::saved::SavedClassifier;
use marlin::{Marlin, MarlinConfig};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((dir, files)) = args.split_first() else {
        eprintln!("usage: predict CLASSIFIER_DIR FILE.npy|VIDEO...");
        std::process::exit(2);
    };
    let device = Default::default();
    let clf = SavedClassifier::<Cpu>::load(dir, &device)?;
    let needs_encoder = clf.classifier.encoder.is_none()
        && files
            .iter()
            .any(|f| f.extension().is_none_or(|e| e != "npy"));
    let encoder = if needs_encoder {
        let cfg = MarlinConfig::from_name("marlin_vit_base_ytf")?;
        let weights = marlin::hub::fetch("marlin_vit_base_ytf", false, true)?;
        Some(Marlin::<Cpu>::load_file(&cfg, &weights, &[], &device)?.0)
    } else {
        None
    };
    println!(
        "{} ({:?}): {}",
        dir.display(),
        clf.info.task,
        clf.info.names.join(", ")
    );
    for f in files {
        match clf.predict_file(f, encoder.as_ref()) {
            Ok(p) => println!("{}: {} {:?}", f.display(), clf.label(&p), p),
            Err(e) => eprintln!("failed: {e}"),
        }
    }
    Ok(())
}
