//! marlin-rs: MARLIN (Masked Autoencoder for facial video Representation LearnINg, CVPR 2023)
//! on burn. The model ([`model::Marlin`]) is numerically equal to `marlin-pytorch` and loads its
//! official checkpoints.

/// `println!` that never panics: when stdout is closed (`marlin info w.pt | head -1`) the line
/// is dropped and the work goes on.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that never panics (see `outln!`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

pub mod backend;
pub mod cli;
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
