//! Faces in the wild: the MTCNN detector (P-Net, R-Net, O-Net) on burn, with its pretrained
//! weights embedded in the binary.
//!
//! Status: the three networks load the embedded weights and equal facenet-pytorch's networks on
//! the same input (tests/face_nets.rs). The detection pipeline around them (image pyramid,
//! NMS, box calibration), cropping and the `--crop-face` / `crop` / `detect` commands come next.

pub mod mtcnn;
