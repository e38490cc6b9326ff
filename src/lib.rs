//! marlin-rs: MARLIN (Masked Autoencoder for facial video Representation LearnINg, CVPR 2023)
//! on burn. The model ([`model::Marlin`]) is numerically equal to `marlin-pytorch` and loads its
//! official checkpoints.

pub mod backend;
pub mod extract;
pub mod face;
pub mod hub;
pub mod masking;
pub mod model;
pub mod probe;
pub mod train;
pub mod util;
pub mod video;

pub use model::{Marlin, MarlinConfig};
