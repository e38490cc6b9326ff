//! `Marlin::extract_video` against marlin-pytorch's `extract_video` on videos the project made
//! (`tools/make_video_fixtures.py`): window counts equal, features within 1e-4 max abs diff.
//! Needs the ffmpeg/ffprobe programs (`.ci/run` installs them).

use marlin::backend::Cpu;
use marlin::extract::{ExtractOptions, Reduction};
use marlin::model::weights::read_safetensors_file;
use marlin::{Marlin, MarlinConfig};
use std::path::{Path, PathBuf};

use crate::common;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/video")
}

fn model() -> Marlin<Cpu> {
    let cfg = MarlinConfig::from_yaml_file(&dir().join("tiny224.yaml")).unwrap();
    Marlin::<Cpu>::load_file(&cfg, &dir().join("tiny224.pt"), &[], &Default::default())
        .unwrap()
        .0
}

#[test]
fn features_and_window_counts_match_peer() {
    let model = model();
    let expected = read_safetensors_file(&dir().join("expected.safetensors")).unwrap();
    assert_eq!(expected.len(), 14);
    for (key, peer) in &expected {
        let mut parts = key.split('|');
        let video = parts.next().unwrap();
        let mut opts = ExtractOptions::default();
        match parts.next().unwrap() {
            "sr2_s16" => {}
            "sr1_s8" => {
                opts.sample_rate = 1;
                opts.stride = 8;
            }
            other => panic!("unknown case {other}"),
        }
        match parts.next() {
            Some("seq") => opts.keep_seq = true,
            Some("mean") => opts.reduction = Reduction::Mean,
            Some("max") => opts.reduction = Reduction::Max,
            None => {}
            Some(other) => panic!("unknown case {other}"),
        }
        for batch_size in [1, 3] {
            opts.batch_size = batch_size;
            let (ours, stats) = model.extract_video(&dir().join(video), &opts).unwrap();
            assert_eq!(
                ours.shape(),
                &peer.shape[..],
                "{key}: shape (window count) differs"
            );
            let ours_flat: Vec<f32> = ours.iter().copied().collect();
            let diff = common::max_abs_diff(&ours_flat, &peer.data).diff;
            if batch_size == 1 {
                eprintln!("{key}: {} clips, max abs diff {diff:.2e}", stats.clips);
            }
            assert!(
                diff <= 1e-4,
                "{key} (batch {batch_size}): max abs diff {diff}"
            );
        }
    }
}

/// FNV-1a 64, as `tools/make_video_fixtures.py` computes it.
fn fnv1a64(h: &mut u64, data: &[u8]) {
    for &b in data {
        *h = (*h ^ b as u64).wrapping_mul(0x100000001B3);
    }
}

#[test]
fn decoded_frames_are_bit_identical_to_pyav_and_opencv() {
    use marlin::video::{probe, FfmpegReader, FrameReader};
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap())
            .unwrap();
    let hashes = manifest["frame_hashes"].as_object().unwrap();
    assert!(!hashes.is_empty());
    for (name, want) in hashes {
        let path = dir().join(name);
        let info = probe(&path).unwrap();
        let mut r = FfmpegReader::open(&path, &info, None).unwrap();
        let mut h = 0xCBF29CE484222325u64;
        let mut n = 0;
        while let Some(f) = r.next_frame().unwrap() {
            fnv1a64(&mut h, &f.data);
            n += 1;
        }
        assert_eq!(
            n,
            want["frames"].as_u64().unwrap() as usize,
            "{name}: frame count"
        );
        assert_eq!(info.frames, n, "{name}: container frame count");
        let ours = format!("{h:016x}");
        assert_eq!(
            ours,
            want["pyav"].as_str().unwrap(),
            "{name}: frames differ from PyAV's"
        );
        assert_eq!(
            ours,
            want["opencv"].as_str().unwrap(),
            "{name}: frames differ from OpenCV's"
        );
    }
}

/// The in-process H.264 decoder (OpenH264, `src/video/h264.rs`) gives FFmpeg's rgb24 frames
/// byte for byte on every H.264 fixture and the bundled sample (B-frames, CABAC, High
/// profile: libx264's defaults), at the decoded size and resized as FFmpeg's
/// `scale=W:H:flags=bilinear` (to 112x112 and, for the sample, 96x160), with the same frame
/// counts; the MPEG-4 fixtures are left to FFmpeg.
#[test]
fn in_process_h264_frames_are_ffmpegs_byte_for_byte() {
    use marlin::video::h264::{probe_mp4, H264Reader};
    use marlin::video::{ffprobe_info, FfmpegReader, FrameReader};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mp4"))
        .collect();
    files.sort();
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4"));
    let mut checked = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(v) = probe_mp4(path).unwrap() else {
            assert!(name.starts_with("mpeg4"), "{name}: not taken in-process");
            continue;
        };
        let info = ffprobe_info(path).unwrap();
        assert_eq!(
            (v.width, v.height, v.frames, v.rotation),
            (info.width, info.height, info.frames, info.rotation),
            "{name}: header"
        );
        for size in [None, Some((112, 112)), Some((96, 160))] {
            let mut a = H264Reader::open(path, &v, size).unwrap();
            let mut b = FfmpegReader::open(path, &info, size).unwrap();
            let (mut n, mut worst) = (0, 0u8);
            loop {
                match (a.next_frame().unwrap(), b.next_frame().unwrap()) {
                    (Some(x), Some(y)) => {
                        assert_eq!((x.width, x.height), (y.width, y.height), "{name}");
                        let d = x
                            .data
                            .iter()
                            .zip(&y.data)
                            .map(|(p, q)| p.abs_diff(*q))
                            .max();
                        worst = worst.max(d.unwrap_or(0));
                        n += 1;
                    }
                    (None, None) => break,
                    (x, y) => panic!(
                        "{name} {size:?}: frame counts differ after {n} ({} vs {})",
                        x.is_some(),
                        y.is_some()
                    ),
                }
            }
            eprintln!("{name} {size:?}: {n} frames, largest pixel difference {worst}");
            assert_eq!(worst, 0, "{name} {size:?}");
            checked += 1;
        }
    }
    assert!(checked >= 3 * 8, "{checked} decodes compared");
}
