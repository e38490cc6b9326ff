//! Helpers shared by the command-line tests (each test file uses some of them).
#![allow(dead_code)]

use ndarray::ArrayD;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository: where the tests were built, or `MARLIN_REPO_DIR` (a test binary run on
/// another machine, as bench/gpu.sh does).
pub fn repo() -> PathBuf {
    std::env::var_os("MARLIN_REPO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

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

/// The largest element-wise difference of two arrays, and where it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Worst {
    pub diff: f32,
    pub index: usize,
    pub ours: f32,
    pub peer: f32,
}

impl std::fmt::Display for Worst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2e} at element {} (ours {}, peer {})",
            self.diff, self.index, self.ours, self.peer
        )
    }
}

/// Max abs diff of `ours` against `peer`. An error, never a small number, when the lengths
/// differ, when there is nothing to compare, or when any value on either side is NaN or
/// infinite (`f32::max` skips NaN, so a NaN output would otherwise score 0).
pub fn try_max_abs_diff(ours: &[f32], peer: &[f32]) -> Result<Worst, String> {
    if ours.len() != peer.len() {
        return Err(format!(
            "lengths differ: ours {}, peer {}",
            ours.len(),
            peer.len()
        ));
    }
    if ours.is_empty() {
        return Err("nothing to compare (both empty)".into());
    }
    let mut worst = Worst {
        diff: 0.0,
        index: 0,
        ours: ours[0],
        peer: peer[0],
    };
    for (i, (&a, &b)) in ours.iter().zip(peer).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            return Err(format!("element {i} is not finite: ours {a}, peer {b}"));
        }
        let d = (a - b).abs();
        if d > worst.diff {
            worst = Worst {
                diff: d,
                index: i,
                ours: a,
                peer: b,
            };
        }
    }
    Ok(worst)
}

/// [`try_max_abs_diff`], failing the test on an error.
pub fn max_abs_diff(ours: &[f32], peer: &[f32]) -> Worst {
    try_max_abs_diff(ours, peer).unwrap_or_else(|e| panic!("{e}"))
}

/// Fails unless `ours` equals `peer` within `tol` (max abs diff, every value finite); prints
/// and returns the worst element.
pub fn assert_close(what: &str, ours: &[f32], peer: &[f32], tol: f32) -> Worst {
    let w = try_max_abs_diff(ours, peer).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: max abs diff {w}");
    assert!(w.diff <= tol, "{what}: max abs diff {w} exceeds {tol:e}");
    w
}

/// The relative L2 distance of all of `ours`' tensors from `reference`'s, over the reference's
/// keys (NaN when any value is not finite, so that a tolerance check fails on it).
pub fn rel_l2(ours: &marlin::model::StateDict, reference: &marlin::model::StateDict) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (k, t) in &reference.tensors {
        for (x, y) in ours.tensors[k].data.iter().zip(&t.data) {
            if !x.is_finite() || !y.is_finite() {
                return f64::NAN;
            }
            e += ((x - y) as f64).powi(2);
            n += (*y as f64).powi(2);
        }
    }
    (e / n.max(1e-30)).sqrt()
}

/// The largest absolute value (the scale of a relative tolerance); fails on a non-finite one.
pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().enumerate().fold(0f32, |m, (i, v)| {
        assert!(v.is_finite(), "element {i} is not finite: {v}");
        m.max(v.abs())
    })
}

/// The shared sample videos (`../shared/samples`, or `$MARLIN_SAMPLES`), which the repository
/// does not hold (their license). Where they are absent a test fails under CI (`CI` set) and
/// is skipped with a loud line elsewhere.
pub fn samples() -> Option<PathBuf> {
    let dir = std::env::var_os("MARLIN_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/samples"));
    let names = [
        "cropped01.mp4",
        "cropped02.mp4",
        "video01.mp4",
        "video02.mp4",
    ];
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let msg = format!(
        "the shared sample videos {missing:?} are not in {} (set MARLIN_SAMPLES to their folder)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}: CI must run the sample tests");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    None
}

/// Runs one of the library's examples (`examples/NAME.rs`; `cargo test` builds them beside
/// the test binaries) with `args`.
pub fn example(name: &str, args: &[&str]) -> Output {
    // target/<profile>/deps/<test binary> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built (cargo test builds examples)",
        bin.display()
    );
    Command::new(bin).args(args).output().unwrap()
}

/// A face's box and landmarks as one list of coordinates (for [`max_abs_diff`]).
pub fn face_coords(f: &marlin::face::Face) -> Vec<f32> {
    f.bbox
        .iter()
        .copied()
        .chain(f.landmarks.iter().flatten().copied())
        .collect()
}

/// The JSON header of a safetensors file (its tensors and metadata).
pub fn safetensors_header(p: &Path) -> String {
    let raw = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes of length")) as usize;
    String::from_utf8_lossy(&raw[8..8 + n]).into_owned()
}
