//! Helpers shared by the command-line tests (each test file uses some of them).
#![allow(dead_code)]

use ndarray::ArrayD;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/video")
}

pub fn marlin(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_marlin"));
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Arguments of `extract` with the tiny 224-px fixture model.
pub fn extract_args(extra: &[&str], out: &Path) -> Vec<String> {
    let f = fixtures();
    let mut args: Vec<String> = vec![
        "extract".into(),
        "--config".into(),
        f.join("tiny224.yaml").display().to_string(),
        "--weights".into(),
        f.join("tiny224.pt").display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `extract` with the tiny 224-px fixture model.
pub fn extract(extra: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(extract_args(extra, out))
        .output()
        .unwrap()
}

pub fn ffmpeg(args: &[&str]) {
    let ok = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ffmpeg {args:?}");
}

/// An H.264 test-pattern video of `frames` frames at `size`.
pub fn pattern_video(out: &Path, size: &str, frames: usize) {
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &format!("testsrc2=size={size}:rate=25"),
        "-frames:v",
        &frames.to_string(),
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        out.to_str().unwrap(),
    ]);
}

pub fn read(p: &Path) -> ArrayD<f32> {
    ndarray_npy::read_npy(p).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn face_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/face")
}

/// A `frames`-frame H.264 video of a still image, optionally through a filter.
pub fn image_video(image: &Path, out: &Path, frames: usize, filter: Option<&str>) {
    let mut args = vec![
        "-loop".to_string(),
        "1".into(),
        "-i".into(),
        image.display().to_string(),
    ];
    if let Some(f) = filter {
        args.extend(["-vf".to_string(), f.to_string()]);
    }
    args.extend(
        [
            "-frames:v",
            &frames.to_string(),
            "-r",
            "25",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Frame count and size of a video, by ffprobe.
pub fn video_shape(p: &Path) -> (usize, usize, usize) {
    let info = marlin::video::probe(p).unwrap();
    (info.frames, info.width, info.height)
}
