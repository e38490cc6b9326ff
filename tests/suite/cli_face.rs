//! Faces in the wild from the command line: `crop`, `detect --draw`, `extract --crop-face`, and
//! the inputs that must fail cleanly (no face, black, empty, corrupt). Needs ffmpeg.

use crate::common;

use common::*;
use std::path::Path;

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn videos_without_a_usable_face_fail_one_line_each_and_nothing_is_half_written() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let inputs = d.join("in");
    std::fs::create_dir(&inputs).unwrap();
    pattern_video(&inputs.join("pattern.mp4"), "160x120", 10);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:size=160x120:rate=25",
        "-frames:v",
        "10",
        "-c:v",
        "libx264",
        inputs.join("black.mp4").to_str().unwrap(),
    ]);
    std::fs::write(inputs.join("empty.mp4"), b"").unwrap();
    std::fs::write(inputs.join("corrupt.mp4"), vec![7u8; 5000]).unwrap();
    image_video(
        &face_fixtures().join("astronaut256.png"),
        &inputs.join("face.mp4"),
        3,
        None,
    );

    let out = d.join("out");
    let o = marlin(
        &[
            "crop",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let failed: Vec<&str> = err.lines().filter(|l| l.starts_with("failed: ")).collect();
    assert_eq!(failed.len(), 4, "{err}");
    for (name, why) in [
        (
            "pattern.mp4",
            "no face found in any of the 10 frames examined",
        ),
        (
            "black.mp4",
            "no face found in any of the 10 frames examined",
        ),
        ("empty.mp4", "empty file"),
        ("corrupt.mp4", "not a video FFmpeg can read"),
    ] {
        assert!(
            failed.iter().any(|l| l.contains(name) && l.contains(why)),
            "{name}: {why}\n{err}"
        );
    }
    // The good video is written; the bad ones leave nothing, and no temp files remain.
    assert_eq!(
        files_in(&out),
        vec!["face.json", "face.mp4", "failures.json"],
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("failures.json")).unwrap()).unwrap();
    assert_eq!(report.as_array().unwrap().len(), 4);

    // extract --crop-face reports the same way.
    let fout = d.join("features");
    let o = extract(
        &[
            inputs.join("black.mp4").to_str().unwrap(),
            inputs.join("face.mp4").to_str().unwrap(),
            "--crop-face",
        ],
        &fout,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("black.mp4: no face found in any of the 10 frames examined"),
        "{err}"
    );
    assert_eq!(files_in(&fout), vec!["face.npy", "failures.json"]);
}

#[test]
fn portrait_and_one_frame_videos_are_cropped_with_tracks_saved() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // A portrait clip (256x360 as displayed) stored sideways with a rotation flag: the face is
    // only upright once the flag is applied.
    let sideways = d.join("sideways.mp4");
    image_video(
        &face_fixtures().join("astronaut256.png"),
        &sideways,
        10,
        Some("pad=256:360:0:52,transpose=1"),
    );
    let portrait = d.join("portrait.mp4");
    ffmpeg(&[
        "-i",
        sideways.to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        portrait.to_str().unwrap(),
    ]);
    std::fs::remove_file(&sideways).unwrap();
    let one = d.join("one.mp4");
    image_video(&face_fixtures().join("two_faces.png"), &one, 1, None);

    let out = d.join("out");
    let o = marlin(
        &[
            "crop",
            portrait.to_str().unwrap(),
            one.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--smooth",
            "5",
            "--quiet",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(video_shape(&out.join("portrait.mp4")), (10, 224, 224));
    assert_eq!(video_shape(&out.join("one.mp4")), (1, 224, 224));

    let track: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("portrait.json")).unwrap()).unwrap();
    assert_eq!(
        (track["width"].as_u64(), track["height"].as_u64()),
        (Some(256), Some(360))
    );
    assert_eq!(track["detected"].as_u64(), Some(10), "{track}");
    // The astronaut's face (box ~[91, 32, 134, 86] in the 256-px image) sits 52 px lower after
    // padding: the crop square is centred near (112, 111).
    let c = &track["frames"][0]["crop"];
    let half = c["side"].as_i64().unwrap() / 2;
    let (cx, cy) = (
        c["x0"].as_i64().unwrap() + half,
        c["y0"].as_i64().unwrap() + half,
    );
    assert!((cx - 112).abs() <= 6 && (cy - 111).abs() <= 6, "{c}");
    // Landmarks are also given in crop pixels, inside the crop.
    let lm = track["frames"][0]["landmarks_crop"].as_array().unwrap();
    assert_eq!(lm.len(), 5);
    for p in lm {
        for v in p.as_array().unwrap() {
            assert!((0.0..224.0).contains(&v.as_f64().unwrap()), "{p}");
        }
    }
}

#[test]
fn extract_crop_face_equals_extracting_the_cropped_frames() {
    // `extract --crop-face VIDEO` must give the same features as `crop --format frames
    // --image-format png` (lossless) followed by plain `extract` of that folder: the same
    // detector, track and crop feed the same encoder. The video has a large and a small face,
    // and the large one moves.
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let video = d.join("wild.mp4");
    image_video(
        &face_fixtures().join("two_faces.png"),
        &video,
        40,
        Some("crop=400:270:'min(t*100,80)':0,scale=480:324"),
    );
    let frames = d.join("crops");
    let o = marlin(
        &[
            "crop",
            video.to_str().unwrap(),
            "--out",
            frames.to_str().unwrap(),
            "--format",
            "frames",
            "--image-format",
            "png",
            "--quiet",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(frames.join("wild")).unwrap().count(), 40);

    let a = d.join("a");
    let o = extract(&[video.to_str().unwrap(), "--crop-face"], &a);
    assert!(o.status.success(), "{}", stderr(&o));
    let b = d.join("b");
    let o = extract(&[frames.join("wild").to_str().unwrap()], &b);
    assert!(o.status.success(), "{}", stderr(&o));
    let plain = d.join("plain");
    let o = extract(&[video.to_str().unwrap()], &plain);
    assert!(o.status.success(), "{}", stderr(&o));

    let (fa, fb, fp) = (
        read(&a.join("wild.npy")),
        read(&b.join("wild.npy")),
        read(&plain.join("wild.npy")),
    );
    assert_eq!(fa.shape(), &[1, 32]);
    assert_eq!(fa.shape(), fb.shape());
    let diff = |x: &ndarray::ArrayD<f32>, y: &ndarray::ArrayD<f32>| {
        let (x, y): (Vec<f32>, Vec<f32>) =
            (x.iter().copied().collect(), y.iter().copied().collect());
        common::max_abs_diff(&x, &y).diff
    };
    assert!(
        diff(&fa, &fb) <= 1e-5,
        "crop-face vs cropped frames: {}",
        diff(&fa, &fb)
    );
    // And cropping matters: the whole-frame features differ.
    assert!(diff(&fa, &fp) > 1e-3, "crop-face equals whole frames");
}

#[test]
fn detect_draws_boxes_and_reports_frames_with_a_face() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = face_fixtures().join("two_faces.png");
    let drawn = d.join("drawn.png");
    let o = marlin(
        &[
            "detect",
            img.to_str().unwrap(),
            "--draw",
            drawn.to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let faces: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(faces.as_array().unwrap().len(), 2, "{faces}");
    let before = image::open(&img).unwrap().to_rgb8();
    let after = image::open(&drawn).unwrap().to_rgb8();
    assert_eq!(before.dimensions(), after.dimensions());
    // The big face's box edge is green now.
    let x1 = faces[0]["bbox"][0].as_f64().unwrap().round() as u32;
    let ymid = ((faces[0]["bbox"][1].as_f64().unwrap() + faces[0]["bbox"][3].as_f64().unwrap())
        / 2.0) as u32;
    assert_eq!(after.get_pixel(x1, ymid).0, [0, 255, 0]);

    let video = d.join("v.mp4");
    image_video(&img, &video, 6, None);
    let drawn_video = d.join("drawn.mp4");
    let o = marlin(
        &[
            "detect",
            video.to_str().unwrap(),
            "--draw",
            drawn_video.to_str().unwrap(),
            "--json",
            d.join("faces.json").to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("a face in 6 of 6 frames (100.0%)"), "{out}");
    assert_eq!(video_shape(&drawn_video), (6, 480, 270));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("faces.json")).unwrap()).unwrap();
    assert_eq!(j["frames"].as_array().unwrap().len(), 6);

    let o = marlin(&["detect", d.join("nope.png").to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("nope.png: no such file or folder"),
        "{}",
        stderr(&o)
    );
}

/// The library call under `marlin crop`: a frame folder of PNG crops, one per frame, whole or
/// absent; a stop before the end leaves nothing behind.
#[test]
fn crop_video_writes_whole_frame_folders_or_nothing() {
    use marlin::backend::Cpu;
    use marlin::face::crop_video::{crop_video, CropFormat, CropVideoOptions, ImageFormat};
    use marlin::face::{DetectOptions, Detector};
    use marlin::video::Input;
    let t = tempfile::tempdir().unwrap();
    let video = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    let frames = video_shape(&video).0;
    let det = Detector::<Cpu>::new(&Default::default(), DetectOptions::default()).unwrap();
    let opts = CropVideoOptions {
        size: 64,
        format: CropFormat::Frames(ImageFormat::Png),
        ..Default::default()
    };
    let input = Input::Video(video.clone());
    let out = t.path().join("faces");
    let c = crop_video(&input, &out, &det, &opts, &|| false)
        .unwrap()
        .expect("not stopped");
    assert_eq!(c.track.frames.len(), frames);
    let names = files_in(&out);
    assert_eq!(names.len(), frames, "{names:?}");
    assert_eq!(names[0], "00000.png");
    let first = marlin::video::read_image(&out.join(&names[0])).unwrap();
    assert_eq!((first.width, first.height), (64, 64));
    // Stopped at once: no output, no temp folder.
    let out2 = t.path().join("stopped");
    assert!(crop_video(&input, &out2, &det, &opts, &|| true)
        .unwrap()
        .is_none());
    assert!(!out2.exists());
    assert_eq!(files_in(t.path()).len(), 1, "{:?}", files_in(t.path()));
}

/// `marlin parse`: both parsers' rows, the map and the crop saved, the regions where a face has
/// them; a frame with no face, a frame past the end and a missing file are one line each.
#[test]
fn parse_draws_both_parsers_and_saves_the_map() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let img = face_fixtures().join("astronaut256.png");
    let (drawn, map, crop) = (d.join("p.png"), d.join("m.npy"), d.join("c.png"));
    let o = marlin(
        &[
            "parse",
            img.to_str().unwrap(),
            "--parser",
            "both",
            "--draw",
            drawn.to_str().unwrap(),
            "--save-map",
            map.to_str().unwrap(),
            "--save-crop",
            crop.to_str().unwrap(),
        ],
        // A picture is read without FFmpeg (GPU machines often have none).
        &[("PATH", "/nonexistent")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("(Mesh)") && out.contains("(Template)"),
        "{out}"
    );
    // Two rows (mesh, template) of crop | labels | Fasking mask.
    assert_eq!(
        image::open(&drawn).unwrap().to_rgb8().dimensions(),
        (672, 448)
    );
    assert_eq!(
        image::open(&crop).unwrap().to_rgb8().dimensions(),
        (224, 224)
    );
    let m: ndarray::Array2<u8> = ndarray_npy::read_npy(&map).unwrap();
    assert_eq!(m.shape(), &[224, 224]);
    let centre = |label: u8| -> [f64; 2] {
        let px: Vec<(usize, usize)> = m
            .indexed_iter()
            .filter(|(_, &v)| v == label)
            .map(|(p, _)| p)
            .collect();
        assert!(!px.is_empty(), "label {label} missing");
        let n = px.len() as f64;
        [
            px.iter().map(|p| p.0 as f64).sum::<f64>() / n,
            px.iter().map(|p| p.1 as f64).sum::<f64>() / n,
        ]
    };
    // Eyes side by side (2/4 on the image's left), brows above them, the nose between eyes and
    // mouth, lips around the inner mouth, hair above the eyes.
    let (le, re, nose, mouth) = (centre(4), centre(5), centre(6), centre(8));
    assert!(le[1] < 112.0 && re[1] > 112.0 && (le[0] - re[0]).abs() < 15.0);
    assert!(centre(2)[0] < le[0] && centre(3)[0] < re[0]);
    assert!(le[0] < nose[0] && nose[0] < mouth[0]);
    assert!(centre(7)[0] < mouth[0] && mouth[0] < centre(9)[0]);
    assert!(centre(10)[0] < le[0] && centre(1)[0] > le[0]);

    let o = marlin(
        &[
            "parse",
            face_fixtures().join("no_face.png").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no_face.png: no face found in frame 0"),
        "{}",
        stderr(&o)
    );
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    let o = marlin(&["parse", sample.to_str().unwrap(), "--frame", "100"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("frame 100 is past the last frame (48 frames)"),
        "{}",
        stderr(&o)
    );
    let o = marlin(&["parse", d.join("nope.mp4").to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("nope.mp4: no such file or folder"),
        "{}",
        stderr(&o)
    );
}
