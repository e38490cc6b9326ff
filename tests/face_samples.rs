//! Detection on the shared in-the-wild sample videos (../shared/samples, or $MARLIN_SAMPLES):
//! a face in at least 98% of frames, and IoU >= 0.7 with hand-labelled boxes
//! (tests/fixtures/face/sample_labels.json). The samples are not in the repository (license);
//! where they are absent the test says so and checks nothing.

use marlin::backend::Cpu;
use marlin::extract::{open_input, Input};
use marlin::face::track::{detect_frames, plan_track};
use marlin::face::{iou, DetectOptions, Detector, TrackOptions};
use std::path::{Path, PathBuf};

fn samples() -> Option<PathBuf> {
    let dir = std::env::var_os("MARLIN_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/samples"));
    if dir.join("video01.mp4").exists() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no sample videos in {} (set MARLIN_SAMPLES)",
            dir.display()
        );
        None
    }
}

#[test]
fn faces_found_in_98_percent_of_frames_and_match_hand_labels() {
    let Some(dir) = samples() else { return };
    let labels: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face/sample_labels.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let det = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let opts = TrackOptions::default();
    let mut worst = 1f32;
    for name in ["video01.mp4", "video02.mp4"] {
        let input = Input::Video(dir.join(name));
        let (mut reader, frames, _) = open_input(&input, None).unwrap();
        let wanted = vec![true; frames];
        let dets = detect_frames(reader.as_mut(), &wanted, &det, &opts, &|| false).unwrap();
        let examined = dets.iter().filter(|d| d.is_some()).count();
        let with_face = dets
            .iter()
            .filter(|d| d.as_ref().is_some_and(|f| !f.is_empty()))
            .count();
        let rate = with_face as f64 / examined as f64;
        eprintln!(
            "{name}: a face in {with_face} of {examined} frames ({:.1}%)",
            rate * 100.0
        );
        assert_eq!(examined, frames, "{name}: every frame decoded");
        assert!(
            rate >= 0.98,
            "{name}: faces in only {:.1}% of frames",
            rate * 100.0
        );
        let track = plan_track(&dets, &wanted, &opts).unwrap();
        for (idx, want) in labels["videos"][name].as_object().unwrap() {
            let i: usize = idx.parse().unwrap();
            let w: Vec<f32> = serde_json::from_value(want.clone()).unwrap();
            let got = track.frames[i]
                .face
                .expect("a detection on a labelled frame");
            let v = iou(&got.bbox, &[w[0], w[1], w[2], w[3]]);
            eprintln!("{name} frame {i}: IoU {v:.3} ({:?} vs {w:?})", got.bbox);
            worst = worst.min(v);
        }
    }
    assert!(worst >= 0.7, "IoU with the hand labels down to {worst}");
}
