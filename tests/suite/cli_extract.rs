//! `marlin extract` as a user runs it: many inputs, bad ones among them, resume, layouts.
//! Needs the ffmpeg/ffprobe programs (`.ci/run` installs them).

use crate::common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn bad_inputs_fail_one_line_each_and_the_batch_goes_on() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::write(d.join("text.mp4"), "this is not a video\n").unwrap();
    std::fs::write(d.join("empty.mp4"), b"").unwrap();
    std::fs::create_dir(d.join("no_images")).unwrap();
    std::fs::write(d.join("no_images/readme.txt"), "x").unwrap();
    // A truncated file whose index is at the end (moov lost) and one with it at the start.
    let full = std::fs::read(fixtures().join("h264_143.mp4")).unwrap();
    std::fs::write(d.join("cut_moov.mp4"), &full[..full.len() / 3]).unwrap();
    let fast = d.join("fast.mp4");
    ffmpeg(&[
        "-i",
        fixtures().join("h264_143.mp4").to_str().unwrap(),
        "-c",
        "copy",
        "-movflags",
        "+faststart",
        fast.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&fast).unwrap();
    std::fs::write(d.join("cut_data.mp4"), &bytes[..bytes.len() * 2 / 5]).unwrap();
    std::fs::remove_file(&fast).unwrap();
    let good = fixtures().join("h264_100.mp4");

    let out = d.join("out");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let inputs = [
        p("missing.mp4"),
        p("text.mp4"),
        p("empty.mp4"),
        p("no_images"),
        p("cut_moov.mp4"),
        p("cut_data.mp4"),
        good.to_str().unwrap().to_string(),
    ];
    let args: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let o = extract(&args, &out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("missing.mp4: no such file or folder"), "{err}");
    assert!(
        err.contains(
            "text.mp4: not a video FFmpeg can read (Invalid data found when processing input)"
        ),
        "{err}"
    );
    assert!(err.contains("empty.mp4: empty file"), "{err}");
    assert!(err.contains("no_images: no videos matching"), "{err}");
    assert!(
        err.contains("cut_moov.mp4: not a video FFmpeg can read"),
        "{err}"
    );
    // The good video and the decodable part of the truncated one are written.
    assert_eq!(read(&out.join("h264_100.npy")).shape(), &[3, 32]);
    let cut = read(&out.join("cut_data.npy"));
    assert!(
        cut.shape()[0] >= 1 && cut.shape()[0] < 4,
        "{:?}",
        cut.shape()
    );
    assert!(err.contains("cut_data.mp4: decoded"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("failures.json")).unwrap()).unwrap();
    let files: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 5, "{report}");
    for r in report.as_array().unwrap() {
        assert_eq!(r["error"].as_str().unwrap().lines().count(), 1, "{r}");
    }
    // Nothing half-written.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn large_rotated_and_tiny_videos_are_resized_and_read() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let k4 = d.join("uhd.mp4");
    pattern_video(&k4, "3840x2160", 12);
    let plain = d.join("plain.mp4");
    pattern_video(&plain, "320x240", 40);
    let rot = d.join("rotated.mp4");
    ffmpeg(&[
        "-i",
        plain.to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        rot.to_str().unwrap(),
    ]);
    let one = d.join("one.mp4");
    pattern_video(&one, "224x224", 1);

    let info = marlin::video::probe(&rot).unwrap();
    assert_eq!(
        (info.width, info.height, info.rotation.rem_euclid(180)),
        (240, 320, 90)
    );

    let out = d.join("out");
    let o = marlin(
        &[
            "extract",
            k4.to_str().unwrap(),
            rot.to_str().unwrap(),
            one.to_str().unwrap(),
            "--config",
            fixtures().join("tiny224.yaml").to_str().unwrap(),
            "--weights",
            fixtures().join("tiny224.pt").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("3840x2160 frames; frames are resized to 224x224"),
        "{err}"
    );
    assert_eq!(read(&out.join("uhd.npy")).shape(), &[1, 32]);
    assert_eq!(read(&out.join("rotated.npy")).shape(), &[1, 32]);
    assert_eq!(read(&out.join("one.npy")).shape(), &[1, 32]);
}

#[test]
fn resume_skips_finished_outputs_and_overwrite_recomputes() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let v = fixtures().join("h264_33.mp4");
    let o = extract(&[v.to_str().unwrap(), "--reduction", "mean"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let npy = out.join("h264_33.npy");
    assert_eq!(read(&npy).shape(), &[32]);
    // A marker value shows whether the file is rewritten.
    ndarray_npy::write_npy(&npy, &ndarray::arr1(&[7.0f32])).unwrap();
    let o = extract(&[v.to_str().unwrap(), "--reduction", "mean"], &out);
    assert!(o.status.success());
    assert_eq!(read(&npy).shape(), &[1]);
    let o = extract(
        &[v.to_str().unwrap(), "--reduction", "mean", "--overwrite"],
        &out,
    );
    assert!(o.status.success());
    assert_eq!(read(&npy).shape(), &[32]);
    assert!(!out.join("failures.json").exists());
}

#[test]
fn directories_keep_relative_paths_and_frame_folders_are_inputs() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("data");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::copy(fixtures().join("h264_20.mp4"), root.join("a/b/clip.mp4")).unwrap();
    std::fs::copy(fixtures().join("mpeg4_20.mp4"), root.join("top.MP4")).unwrap();
    std::fs::write(root.join("notes.txt"), "ignored").unwrap();
    // YouTube Faces layout: person/video/frames.
    let frames = root.join("person/0");
    std::fs::create_dir_all(&frames).unwrap();
    for i in 1..=20 {
        std::fs::copy(
            fixtures().join(format!("frames_40/{i}.png")),
            frames.join(format!("{i}.png")),
        )
        .unwrap();
    }
    let out = t.path().join("out");
    let list = t.path().join("list.txt");
    std::fs::write(&list, format!("# inputs\n{}\n", root.display())).unwrap();
    let o = extract(&["--list", list.to_str().unwrap(), "--keep-seq"], &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&out.join("a/b/clip.npy")).shape(), &[1, 1568, 32]);
    assert_eq!(read(&out.join("top.npy")).shape(), &[1, 1568, 32]);
    assert_eq!(read(&out.join("person/0.npy")).shape(), &[1, 1568, 32]);
    assert!(!out.join("notes.npy").exists());
}

#[test]
fn missing_ffmpeg_and_offline_weights_get_one_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let v = fixtures().join("h264_20.mp4");
    let empty_path = t.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    // MPEG-4 Part 2 needs FFmpeg: one line naming the file, the codec and what to install.
    let mpeg4 = fixtures().join("mpeg4_20.mp4");
    let mut c = Command::new(env!("CARGO_BIN_EXE_marlin"));
    c.args(extract_args(
        &[mpeg4.to_str().unwrap()],
        &t.path().join("o"),
    ))
    .env("PATH", &empty_path);
    let o = c.output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("mpeg4_20.mp4: its video is mp4v, not H.264: reading it needs FFmpeg")
            && err.contains("apt-get install ffmpeg"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let home = t.path().join("cache");
    let o = marlin(
        &[
            "extract",
            v.to_str().unwrap(),
            "--out",
            t.path().join("o").to_str().unwrap(),
            "--quiet",
        ],
        &[
            ("MARLIN_HOME", home.to_str().unwrap()),
            ("MARLIN_DOWNLOAD_BASE", "http://127.0.0.1:9"),
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot download http://127.0.0.1:9/marlin_vit_base_ytf.encoder.pt"),
        "{err}"
    );
    assert!(err.contains("pass --weights FILE"), "{err}");
    assert!(
        err.contains(
            &home
                .join("marlin_vit_base_ytf.encoder.pt")
                .display()
                .to_string()
        ),
        "{err}"
    );
}

/// H.264 in MP4 is decoded in-process: with FFmpeg (and cargo) off PATH, `extract` of the
/// H.264 fixtures gives the same features as FFmpeg's pipe (the frames are byte for byte
/// FFmpeg's: vendor/README.md), keep_seq included, and the same window counts.
#[test]
fn h264_videos_extract_without_ffmpeg_as_with_it() {
    let t = tempfile::tempdir().unwrap();
    let empty_path = t.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    let videos: Vec<String> = ["h264_10.mp4", "h264_33.mp4", "h264_143.mp4"]
        .iter()
        .map(|v| fixtures().join(v).display().to_string())
        .collect();
    let mut worst = 0f32;
    for seq in [false, true] {
        let (a, b) = (
            t.path().join(format!("in-{seq}")),
            t.path().join(format!("ff-{seq}")),
        );
        let mut extra: Vec<&str> = videos.iter().map(String::as_str).collect();
        if seq {
            extra.push("--keep-seq");
        }
        let mut c = Command::new(env!("CARGO_BIN_EXE_marlin"));
        c.args(extract_args(&extra, &a)).env("PATH", &empty_path);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let o = marlin(
            &extract_args(&extra, &b)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            &[("MARLIN_DECODER", "ffmpeg")],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        for v in ["h264_10", "h264_33", "h264_143"] {
            let (x, y) = (
                read(&a.join(format!("{v}.npy"))),
                read(&b.join(format!("{v}.npy"))),
            );
            assert_eq!(x.shape(), y.shape(), "{v}: window count");
            let (x, y): (Vec<f32>, Vec<f32>) =
                (x.iter().copied().collect(), y.iter().copied().collect());
            worst = worst.max(max_abs_diff(&x, &y).diff);
        }
    }
    eprintln!("in-process H.264 vs FFmpeg's pipe: features max abs diff {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}

#[test]
fn ctrl_c_leaves_only_whole_outputs_and_a_rerun_finishes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("videos");
    std::fs::create_dir(&src).unwrap();
    // Each input costs the decoding of 143 frames (tens of milliseconds in-process, an ffprobe
    // and an ffmpeg process through FFmpeg), so the 39 inputs after the first take far longer
    // than the few milliseconds between the first output and the signal, whatever the
    // machine's speed: the run is always interrupted part-way.
    const N: usize = 40;
    for i in 0..N {
        std::fs::copy(
            fixtures().join("h264_143.mp4"),
            src.join(format!("v{i:02}.mp4")),
        )
        .unwrap();
    }
    let out = t.path().join("out");
    let args = extract_args(&[src.to_str().unwrap(), "--batch-size", "1"], &out);
    let child = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as the first whole output exists (temp files do not count).
    let outputs = || {
        std::fs::read_dir(&out).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "npy"))
                .count()
        })
    };
    let started = std::time::Instant::now();
    while outputs() == 0 && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(outputs() > 0, "no output within 120 s");
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    let written: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        written
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "npy")),
        "{written:?}"
    );
    for p in &written {
        assert_eq!(read(p).shape(), &[4, 32], "{}", p.display());
    }
    eprintln!("interrupted after {} of {N} outputs", written.len());
    assert!(
        !written.is_empty() && written.len() < N,
        "{} outputs",
        written.len()
    );
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), N);
}

/// `marlin info w.pt | head -1` and the like: a closed stdout is not a crash.
#[test]
fn a_closed_stdout_does_not_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // every write to the pipe now fails with EPIPE
    let o = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(["config", "marlin_vit_base_ytf"])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The library's examples run and agree with the command line.
#[test]
fn library_examples_run_and_match_the_cli() {
    let o = example("extract_video", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("100 frames, 3 windows -> features [3, 32]"),
        "{out}"
    );

    // extract_folder crops faces: the same features as `marlin extract --crop-face`.
    let t = tempfile::tempdir().unwrap();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let f = fixtures();
    let (lib, cli) = (t.path().join("lib"), t.path().join("cli"));
    let o = example(
        "extract_folder",
        &[
            assets.to_str().unwrap(),
            lib.to_str().unwrap(),
            f.join("tiny224.yaml").to_str().unwrap(),
            f.join("tiny224.pt").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("1 written, 0 skipped"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let video = assets.join("sample_face.mp4");
    let o = extract(&[video.to_str().unwrap(), "--crop-face"], &cli);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        read(&lib.join("sample_face.npy")),
        read(&cli.join("sample_face.npy")),
    );
    assert_eq!(a.shape(), b.shape());
    let (a, b): (Vec<f32>, Vec<f32>) = (a.iter().copied().collect(), b.iter().copied().collect());
    assert_eq!(max_abs_diff(&a, &b).diff, 0.0);
}
