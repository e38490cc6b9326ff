//! The MTCNN detection pipeline (pyramid, NMS, calibration, landmarks) against facenet-pytorch
//! 2.6's `detect_face` on fixture images (tools/make_face_fixtures.py): the same number of faces,
//! boxes and landmarks within 0.05 px, scores within 1e-4.

use marlin::backend::Cpu;
use marlin::face::{DetectOptions, Detector, Face};
use marlin::video::read_image;
use std::path::Path;

use crate::common;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face")
}

#[test]
fn detections_match_facenet_pytorch() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("detections.json")).unwrap())
            .unwrap();
    let det = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let names = ["astronaut256", "two_faces", "no_face"];
    let frames: Vec<_> = names
        .iter()
        .map(|n| read_image(&fixtures().join(format!("{n}.png"))).unwrap())
        .collect();
    // All three in one call: frames of different sizes are grouped internally.
    let got = det.detect(&frames.iter().collect::<Vec<_>>());
    let (mut coords, mut scores) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    let flat = common::face_coords;
    for (name, faces) in names.iter().zip(&got) {
        let want: Vec<Face> = serde_json::from_value(expected[name].clone()).unwrap();
        assert_eq!(faces.len(), want.len(), "{name}: {faces:?} vs {want:?}");
        for (a, b) in faces.iter().zip(&want) {
            coords.0.extend(flat(a));
            coords.1.extend(flat(b));
            scores.0.push(a.score);
            scores.1.push(b.score);
        }
    }
    assert_eq!(
        scores.0.len(),
        3,
        "faces compared (astronaut 1, two_faces 2, no_face 0)"
    );
    common::assert_close("detections: coordinates (px)", &coords.0, &coords.1, 0.05);
    common::assert_close("detections: scores", &scores.0, &scores.1, 1e-4);
}

#[test]
fn burn_path_equals_host_path() {
    // The CPU backend runs the networks on the host (im2col + gemm); other backends run them
    // through burn. Both must find the same faces.
    let host = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let burn = Detector::<Cpu>::new(&Default::default(), DetectOptions::default())
        .unwrap()
        .without_host_nets();
    let f = read_image(&fixtures().join("two_faces.png")).unwrap();
    let (a, b) = (host.detect(&[&f]), burn.detect(&[&f]));
    assert_eq!(a[0].len(), 2);
    assert_eq!(a[0].len(), b[0].len());
    for (x, y) in a[0].iter().zip(&b[0]) {
        for k in 0..4 {
            assert!((x.bbox[k] - y.bbox[k]).abs() < 0.05, "{x:?} vs {y:?}");
        }
        assert!((x.score - y.score).abs() < 1e-4);
    }
}

#[test]
fn batching_does_not_change_results() {
    let det = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let f = read_image(&fixtures().join("two_faces.png")).unwrap();
    let one = det.detect(&[&f]);
    let three = det.detect(&[&f, &f, &f]);
    for faces in &three {
        assert_eq!(faces.len(), 2);
        for (a, b) in faces.iter().zip(&one[0]) {
            for k in 0..4 {
                assert!((a.bbox[k] - b.bbox[k]).abs() < 1e-3);
            }
        }
    }
}

#[test]
fn crop_equals_marlin_pytorch_crop() {
    // marlin-pytorch's crop (crop_with_padding + cv2.resize, bilinear) of the largest face,
    // from the same box: our crop differs only by OpenCV's fixed-point rounding (<= 2 levels).
    use marlin::face::{crop_resize, CropBox};
    let det = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    for name in ["astronaut256", "two_faces"] {
        let f = read_image(&fixtures().join(format!("{name}.png"))).unwrap();
        let faces = det.detect(&[&f]).remove(0);
        let largest = faces
            .iter()
            .max_by(|a, b| a.area().total_cmp(&b.area()))
            .unwrap();
        let ours = crop_resize(&f, &CropBox::around(largest.bbox, 0.0), 224);
        let want = read_image(&fixtures().join(format!("crop_{name}.png"))).unwrap();
        assert_eq!((ours.width, ours.height), (want.width, want.height));
        let diffs: Vec<i32> = ours
            .data
            .iter()
            .zip(&want.data)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = diffs.iter().max().copied().unwrap_or(0);
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        eprintln!("{name}: crop vs marlin-pytorch: max diff {max}, mean {mean:.3}");
        assert!(max <= 2, "{name}: crop differs by {max} levels");
    }
}

#[test]
fn detecting_on_a_downscaled_copy_maps_boxes_back() {
    use marlin::face::iou;
    let f = read_image(&fixtures().join("two_faces.png")).unwrap();
    let full = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let half = Detector::<Cpu>::new(
        &Default::default(),
        DetectOptions {
            max_side: Some(240),
            ..Default::default()
        },
    )
    .unwrap();
    let (a, b) = (full.detect(&[&f]).remove(0), half.detect(&[&f]).remove(0));
    // The large face (150 px) is found at half resolution, in frame coordinates.
    let big = &a[0];
    let ious: Vec<f32> = b.iter().map(|x| iou(&x.bbox, &big.bbox)).collect();
    let best = common::max_abs(&ious);
    assert!(best >= 0.8, "IoU {best}: {b:?} vs {big:?}");
}
