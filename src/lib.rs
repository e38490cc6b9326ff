//! marlin-rs: MARLIN (Masked Autoencoder for facial video Representation LearnINg, CVPR 2023)
//! on burn. The model ([`model::Marlin`]) is numerically equal to `marlin-pytorch` and loads its
//! official checkpoints; the `marlin` command line is a thin layer over this library.
//!
//! # Using the library
//!
//! One video to features, as marlin-pytorch's `extract_video` (here with the small test model
//! of this repository; `MarlinConfig::from_name("marlin_vit_base_ytf")` and
//! [`hub::fetch`] give the released ones):
//!
//! ```
//! use marlin::backend::Cpu;
//! use marlin::extract::ExtractOptions;
//! use marlin::{Marlin, MarlinConfig};
//! use std::path::Path;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new("tests/fixtures/video");
//! let cfg = MarlinConfig::from_yaml_file(&dir.join("tiny224.yaml"))?;
//! let (model, _) = Marlin::<Cpu>::load_file(&cfg, &dir.join("tiny224.pt"), &[], &Default::default())?;
//! let (features, stats) = model.extract_video(&dir.join("h264_100.mp4"), &ExtractOptions::default())?;
//! assert_eq!(features.shape(), &[3, 32]); // 100 frames: 3 windows of 16 frames at rate 2
//! assert_eq!(stats.clips, 3);
//! # Ok(()) }
//! ```
//!
//! Where to go next:
//! - many inputs, batched across videos, faces cropped, resumable, failures as values:
//!   [`extract::inputs::discover`] and [`extract::batch::extract_to_npy`] (or
//!   [`extract::batch::extract_many`] with your own [`extract::batch::Sink`]);
//! - faces in the wild: [`face::Detector`], [`face::track`], [`face::crop`];
//! - a trained probe or fine-tuned classifier: [`probe::saved::SavedClassifier`];
//! - pretraining: [`train::Pretrainer`] (one step) and [`train::run::pretrain`] (a whole run);
//! - the CPU or a CUDA device picked at run time: [`backend::run_on`].
//!
//! `examples/` has these as programs (`cargo run --release --example extract_video`).

pub mod backend;
pub mod device_error;
pub mod distributed;
pub mod doctor;
pub mod engine;
pub mod extract;
pub mod face;
pub mod hub;
pub mod kernels;
pub mod masking;
pub mod model;
pub mod probe;
pub mod train;
pub mod util;
pub mod video;

pub use model::{Marlin, MarlinConfig};
