//! Faces in the wild: the MTCNN detector (P-Net, R-Net, O-Net) on burn with its pretrained
//! weights embedded in the binary, per-video face tracks (selection, gap filling, smoothing)
//! and the reference's square crop.

pub mod detect;
pub mod mtcnn;

pub use detect::{iou, DetectOptions, Detector, Face};
