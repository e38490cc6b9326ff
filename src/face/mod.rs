//! Faces in the wild: the MTCNN detector (P-Net, R-Net, O-Net) on burn with its pretrained
//! weights embedded in the binary, per-video face tracks (selection, gap filling, smoothing)
//! and the reference's square crop.

pub mod cpu_nets;
pub mod cpu_parser;
pub mod crop;
pub mod crop_video;
pub mod detect;
pub mod draw;
pub mod layers;
pub mod mesh;
pub mod mtcnn;
pub mod parse_view;
pub mod parser;
pub mod parsing;
pub mod prepare;
pub mod selfie;
pub mod track;

pub use crop::{crop_resize, CropBox};
pub use detect::{iou, DetectOptions, Detector, Face};
pub use track::{FaceSelect, Track, TrackOptions};
