//! The dense face parser's networks (MediaPipe's face mesh and selfie segmentation, embedded)
//! against TensorFlow Lite's own interpreter on the same inputs: fixtures from
//! tools/convert_mediapipe_weights.py (the bundled sample's face crop, mirrored and rotated).
//! Both paths: burn's ops (what CUDA runs) and the host kernels of the CPU backend.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use marlin::backend::Cpu;
use marlin::face::cpu_parser::{HostMesh, HostSelfie, Img};
use marlin::face::parser::FaceParser;
use marlin::model::load::to_f32_vec;
use marlin::model::weights::{read_safetensors_file, HostTensor};
use std::collections::BTreeMap;

use crate::common;

fn fixtures() -> BTreeMap<String, HostTensor> {
    read_safetensors_file(&common::face_fixtures().join("parser_nets.safetensors")).unwrap()
}

/// A `[n, n, 3]` u8 fixture input as the network's `[1, 3, n, n]` in [0, 1].
fn input<B: Backend>(h: &HostTensor, dev: &B::Device) -> Tensor<B, 4> {
    let n = h.shape[0];
    let mut chw = vec![0f32; 3 * n * n];
    for (i, v) in h.data.iter().enumerate() {
        let (p, c) = (i / 3, i % 3);
        chw[c * n * n + p] = v / 255.0;
    }
    Tensor::from_data(TensorData::new(chw, [1, 3, n, n]), dev)
}

/// The same input as the host path's `[n, n, 3]` image.
fn host_input(h: &HostTensor) -> Img {
    let n = h.shape[0];
    Img {
        h: n,
        w: n,
        c: 3,
        d: h.data.iter().map(|v| v / 255.0).collect(),
    }
}

/// The face mesh network through burn's ops on `B` against TFLite: landmarks within 1e-3 px,
/// the presence logit within 1e-4.
fn mesh_matches_tflite<B: Backend>(dev: &B::Device) {
    let io = fixtures();
    let p = FaceParser::<B>::embedded(dev).unwrap();
    for case in ["plain", "mirrored", "rotated"] {
        let (points, logit) = p
            .mesh
            .forward(input::<B>(&io[&format!("mesh.{case}.input")], dev));
        assert_eq!(points.dims(), [1, 468, 3]);
        // Landmarks in input pixels (0..192): 1e-3 px.
        common::assert_close(
            &format!("mesh {case} landmarks"),
            &to_f32_vec(points),
            &io[&format!("mesh.{case}.output0")].data,
            1e-3,
        );
        common::assert_close(
            &format!("mesh {case} presence logit"),
            &to_f32_vec(logit),
            &io[&format!("mesh.{case}.output1")].data,
            1e-4,
        );
    }
}

/// The selfie segmentation network through burn's ops on `B` against TFLite: the person mask
/// within 1e-4.
fn selfie_matches_tflite<B: Backend>(dev: &B::Device) {
    let io = fixtures();
    let p = FaceParser::<B>::embedded(dev).unwrap();
    for case in ["plain", "mirrored", "rotated"] {
        let mask = p
            .selfie
            .forward(input::<B>(&io[&format!("selfie.{case}.input")], dev));
        assert_eq!(mask.dims(), [1, 256, 256]);
        common::assert_close(
            &format!("selfie {case} person mask"),
            &to_f32_vec(mask),
            &io[&format!("selfie.{case}.output0")].data,
            1e-4,
        );
    }
}

/// Both networks of the parser through burn's ops on `B` (what a GPU runs; the GPU suite's).
#[cfg(any(feature = "cuda", feature = "vulkan"))]
pub(crate) fn nets_match_tflite<B: Backend>(dev: &B::Device) {
    mesh_matches_tflite::<B>(dev);
    selfie_matches_tflite::<B>(dev);
}

#[test]
fn face_mesh_matches_tflite() {
    mesh_matches_tflite::<Cpu>(&Default::default());
    let io = fixtures();
    let p = FaceParser::<Cpu>::embedded(&Default::default()).unwrap();
    let host = HostMesh::new(&p.mesh);
    for case in ["plain", "mirrored", "rotated"] {
        let (points, logit) = host.forward(&host_input(&io[&format!("mesh.{case}.input")]));
        common::assert_close(
            &format!("host mesh {case} landmarks"),
            &points,
            &io[&format!("mesh.{case}.output0")].data,
            1e-3,
        );
        common::assert_close(
            &format!("host mesh {case} presence logit"),
            &[logit],
            &io[&format!("mesh.{case}.output1")].data,
            1e-4,
        );
    }
    // The three inputs are different faces to the network: the landmarks move.
    let a = &io["mesh.plain.output0"].data;
    let b = &io["mesh.mirrored.output0"].data;
    assert!(common::max_abs_diff(a, b).diff > 5.0);
}

#[test]
fn selfie_segmentation_matches_tflite() {
    selfie_matches_tflite::<Cpu>(&Default::default());
    let io = fixtures();
    let p = FaceParser::<Cpu>::embedded(&Default::default()).unwrap();
    // The host path sums in another order; at 13 pixels of the rotated crop's bottom edge
    // (its grey fill, where the network is unsure) that moves the probability by up to 1.8e-4:
    // 2e-4 everywhere, 1e-4 off an 8-pixel border.
    let host = HostSelfie::new(&p.selfie);
    let interior = |m: &[f32]| -> Vec<f32> {
        (0..m.len())
            .filter(|i| (8..248).contains(&(i / 256)) && (8..248).contains(&(i % 256)))
            .map(|i| m[i])
            .collect()
    };
    for case in ["plain", "mirrored", "rotated"] {
        let mask = host.forward(&host_input(&io[&format!("selfie.{case}.input")]));
        let peer = &io[&format!("selfie.{case}.output0")].data;
        common::assert_close(
            &format!("host selfie {case} person mask"),
            &mask,
            peer,
            2e-4,
        );
        common::assert_close(
            &format!("host selfie {case} person mask off the border"),
            &interior(&mask),
            &interior(peer),
            1e-4,
        );
    }
}
