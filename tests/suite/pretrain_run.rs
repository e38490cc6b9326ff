//! `marlin pretrain` runs: a kill -9 mid-run then `--resume` ends with the same weights and
//! metrics as an uninterrupted run; pretraining on the shared face samples lowers the
//! validation reconstruction loss; the sample image's panels are where they should be.
//! Needs ffmpeg.

use crate::common;

use common::*;
use marlin::model::weights::read_safetensors_file;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tiny fixture model with a fast schedule (no warmup to speak of) and `strategy`.
fn tiny_config(dir: &Path, strategy: &str) -> PathBuf {
    let base = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny_a.yaml"),
    )
    .unwrap();
    let cfg = base
        .replace(
            "mask_strategy: fasking",
            &format!("mask_strategy: {strategy}"),
        )
        .replace("base: 0.00015", "base: 0.2")
        .replace("warmup: 1.0e-06", "warmup: 0.001")
        .replace("min: 1.0e-05", "min: 0.01")
        .replace("warmup_epochs: 40", "warmup_epochs: 1");
    let p = dir.join("tiny.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// `DATA/crop_images_DB/<name>/NNN.jpg` from `frames` frames of `video` starting at `start`,
/// at 64x64, and the split CSVs.
fn dataset(
    root: &Path,
    video: &Path,
    train: &[(&str, usize)],
    val: &[(&str, usize)],
    frames: usize,
) {
    for (name, start) in train.iter().chain(val) {
        let dir = root.join("crop_images_DB").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        ffmpeg(&[
            "-i",
            video.to_str().unwrap(),
            "-vf",
            &format!("select=gte(n\\,{start}),scale=64:64"),
            "-vsync",
            "0",
            "-frames:v",
            &frames.to_string(),
            dir.join("%03d.jpg").to_str().unwrap(),
        ]);
    }
    for (split, list) in [("train", train), ("val", val)] {
        let rows: Vec<String> = list.iter().map(|(n, _)| format!("{n},{frames}")).collect();
        std::fs::write(
            root.join(format!("{split}_set.csv")),
            format!("path,len\n{}\n", rows.join("\n")),
        )
        .unwrap();
    }
}

fn pretrain_args(cfg: &Path, data: &Path, out: &Path, epochs: usize) -> Vec<String> {
    [
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        &epochs.to_string(),
        "--batch-size",
        "2",
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

/// `marlin pretrain` to the end (asserting success); the rows of its metrics.csv.
fn pretrain(cfg: &Path, data: &Path, out: &Path, epochs: usize) -> Vec<String> {
    let args = pretrain_args(cfg, data, out, epochs);
    let o = marlin(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    metric_rows(out)
}

fn metric_rows(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(String::from)
        .collect()
}

/// Three training clips and one validation clip of 20 frames from the bundled sample video in
/// `d/data`; the data root and the video.
fn sample_dataset(d: &Path) -> (PathBuf, PathBuf) {
    let data = d.join("data");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    dataset(
        &data,
        &sample,
        &[("a/0", 0), ("a/1", 8), ("a/2", 16)],
        &[("b/0", 24)],
        20,
    );
    (data, sample)
}

/// The largest difference between the `model.safetensors` of two runs (NaN-checked), which
/// must hold the same tensors.
fn weights_diff(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (
        read_safetensors_file(&a.join("model.safetensors")).unwrap(),
        read_safetensors_file(&b.join("model.safetensors")).unwrap(),
    );
    assert_eq!(
        wa.keys().collect::<Vec<_>>(),
        wb.keys().collect::<Vec<_>>(),
        "the same tensors"
    );
    let mut worst = 0f32;
    for (k, v) in &wa {
        worst = worst.max(common::max_abs_diff(&wb[k].data, &v.data).diff);
    }
    worst
}

#[test]
fn kill_9_then_resume_ends_like_an_uninterrupted_run() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (data, sample) = sample_dataset(d);
    let cfg = tiny_config(d, "random");
    let epochs = 120;

    let whole = d.join("whole");
    pretrain(&cfg, &data, &whole, epochs);

    // The same run, killed (SIGKILL) once a few epochs are checkpointed, then resumed.
    let cut = d.join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(pretrain_args(&cfg, &data, &cut, epochs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let done = std::fs::read_to_string(cut.join("metrics.csv"))
            .map(|s| s.lines().count().saturating_sub(1))
            .unwrap_or(0);
        if done >= 3 || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = metric_rows(&cut).len();
    assert!(
        before >= 3 && before < epochs,
        "killed after {before} epochs"
    );
    // Whatever the kill interrupted, the checkpoint on disk is whole.
    read_safetensors_file(&cut.join("checkpoint.safetensors")).unwrap();

    // Without --resume the run in `cut` is not overwritten.
    let o = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(pretrain_args(&cfg, &data, &cut, epochs))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("a run is already there"),
        "{}",
        stderr(&o)
    );
    assert_eq!(metric_rows(&cut).len(), before);

    let mut args = pretrain_args(&cfg, &data, &cut, epochs);
    args.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed at epoch"), "{}", stderr(&o));

    let (a, b) = (metric_rows(&whole), metric_rows(&cut));
    assert_eq!(b.len(), epochs, "every epoch once");
    let epochs_of = |rows: &[String]| -> Vec<usize> {
        rows.iter()
            .map(|r| r.split(',').next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(epochs_of(&b), (0..epochs).collect::<Vec<_>>());
    // Same schedule and same losses, epoch by epoch (timing columns aside).
    let losses = |r: &String| r.split(',').take(10).collect::<Vec<_>>().join(",");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(losses(x), losses(y));
    }
    let worst = weights_diff(&whole, &cut);
    assert!(worst <= 1e-6, "resumed weights differ by {worst}");
    // The CPU's default step is the training engine's: its checkpoint says so.
    assert!(
        common::safetensors_header(&cut.join("checkpoint.safetensors")).contains("engine_updates"),
        "the training engine wrote the checkpoint"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&cut)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The trained encoder is a checkpoint `extract` reads.
    let o = marlin(
        &[
            "extract",
            sample.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--weights",
            cut.join("model.safetensors").to_str().unwrap(),
            "--out",
            d.join("feats").to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The training engine's step and burn's autodiff step train alike over a few epochs: losses and
/// weights within 1e-4 (4.7e-6 seen; their single steps equal the peer's, `train_engine`); a
/// run keeps the step that wrote its checkpoint.
#[test]
fn the_training_engine_and_burns_step_train_alike() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (data, _) = sample_dataset(d);
    let cfg = tiny_config(d, "fasking");
    let epochs = 3;
    let run = |step: &str, out: &Path, extra: &[&str]| {
        let mut args = pretrain_args(&cfg, &data, out, epochs);
        args.extend(["--step", step].iter().chain(extra).map(|s| s.to_string()));
        marlin(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    let (eng, bur) = (d.join("engine"), d.join("burn"));
    for (step, out) in [("engine", &eng), ("burn", &bur)] {
        let o = run(step, out, &[]);
        assert!(o.status.success(), "{step}: {}", stderr(&o));
    }
    let values = |out: &Path| -> Vec<Vec<f64>> {
        metric_rows(out)
            .iter()
            .map(|l| l.split(',').take(10).map(|v| v.parse().unwrap()).collect())
            .collect()
    };
    let (a, b) = (values(&eng), values(&bur));
    assert_eq!(a.len(), epochs);
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.iter().zip(y) {
            assert!(
                (u - v).abs() <= 1e-4 * u.abs().max(1.0),
                "engine {x:?}\nburn   {y:?}"
            );
        }
    }
    let worst = weights_diff(&eng, &bur);
    eprintln!("{epochs} epochs, engine vs burn: max |dw| {worst:.2e}");
    assert!(worst <= 1e-4, "weights differ by {worst}");

    // A run resumes on the step that wrote it; the other one says what to do.
    let o = run("burn", &eng, &["--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("trained by the training engine")
            && stderr(&o).contains("--step engine"),
        "{}",
        stderr(&o)
    );
    let o = run("engine", &bur, &["--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--step burn"), "{}", stderr(&o));
    // A model the engine does not cover: `auto` trains it on burn's step, `engine` says why.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("gp_weight: 0.0", "gp_weight: 10.0")).unwrap();
    let o = run("engine", &d.join("gp"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not cover the gradient penalty"),
        "{}",
        stderr(&o)
    );
}

/// R^2 of the reconstruction panel against the ground truth over the masked pixels of a
/// sample PNG (gt | masked | reconstruction): 1 - MSE / variance of the masked pixels around
/// their mean. A mean-colour reconstruction scores about 0 or below; a face coming back, near 1.
fn masked_r2(png: &Path) -> f64 {
    let img = image::open(png).unwrap().to_rgb8();
    let s = img.height();
    assert_eq!(img.width(), 3 * s, "{}", png.display());
    let (mut gt, mut rec) = (Vec::new(), Vec::new());
    for y in 0..s {
        for x in 0..s {
            if img.get_pixel(x + s, y).0 == [128, 128, 128] {
                for c in 0..3 {
                    gt.push(img.get_pixel(x, y).0[c] as f64 / 255.0);
                    rec.push(img.get_pixel(x + 2 * s, y).0[c] as f64 / 255.0);
                }
            }
        }
    }
    assert!(!gt.is_empty(), "{}: no masked pixels", png.display());
    let mean = gt.iter().sum::<f64>() / gt.len() as f64;
    let var = gt.iter().map(|g| (g - mean).powi(2)).sum::<f64>();
    let err = gt
        .iter()
        .zip(&rec)
        .map(|(g, r)| (g - r).powi(2))
        .sum::<f64>();
    1.0 - err / var
}

#[test]
fn pretraining_on_a_shared_face_sample_brings_the_face_back() {
    let Some(samples) = common::samples() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data = d.join("data");
    // Train on four overlapping 36-frame stretches of cropped01's frames 0-103, validate on its
    // held-out frames 104-142. (Another person, cropped02, needs more than 300 steps of this
    // model: it still reconstructs a mean colour there.)
    dataset(
        &data,
        &samples.join("cropped01.mp4"),
        &[("c1/0", 0), ("c1/23", 23), ("c1/45", 45), ("c1/68", 68)],
        &[("c1/val", 104)],
        36,
    );
    let o = marlin(&["config", "tiny_smoke"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = d.join("tiny_smoke.yaml");
    std::fs::write(&cfg, &o.stdout).unwrap();
    let out = d.join("run");
    // 150 epochs of 2 steps (4 clips, batch 2): 300 steps.
    let rows = pretrain(&cfg, &data, &out, 150);
    assert_eq!(rows.len(), 150);
    let val_rec = |r: &String| r.split(',').nth(7).unwrap().parse::<f64>().unwrap();
    let (first, last) = (val_rec(&rows[0]), val_rec(rows.last().unwrap()));
    eprintln!("validation reconstruction loss: {first:.4} -> {last:.4}");
    assert!(last <= 0.7 * first, "{first} -> {last}");
    // The face comes back: the masked pixels of the last sample image are mostly explained
    // by the reconstruction (seeds 0-6 gave R^2 0.66-0.82), while 30 epochs in the model
    // still predicts about the mean colour.
    // The 32 px sample is enlarged 4x (nearest neighbour) to be looked at.
    let img = image::open(out.join("samples/epoch_0149.png")).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 128, 128));
    let early = masked_r2(&out.join("samples/epoch_0030.png"));
    let late = masked_r2(&out.join("samples/epoch_0149.png"));
    eprintln!("masked-pixel R^2 of the sample image: epoch 30 {early:.3}, epoch 149 {late:.3}");
    assert!(early < 0.2, "epoch 30 already at R^2 {early}");
    assert!(late >= 0.5, "no face in the reconstruction: R^2 {late}");
}

#[test]
fn prepare_writes_the_reference_layout_and_fasking_pretrains_on_it() {
    // Raw input: the bundled sample, and the same video letterboxed into a larger frame.
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let raw = d.join("raw/person_a");
    std::fs::create_dir_all(&raw).unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    std::fs::copy(&sample, raw.join("clip1.mp4")).unwrap();
    ffmpeg(&[
        "-i",
        sample.to_str().unwrap(),
        "-vf",
        "scale=320:240,pad=320:320:0:40",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        raw.join("clip2.mp4").to_str().unwrap(),
    ]);
    std::fs::write(d.join("raw/person_a/notes.txt"), "not a video").unwrap();
    let data = d.join("data");
    let o = marlin(
        &[
            "prepare",
            d.join("raw").to_str().unwrap(),
            "--out",
            data.to_str().unwrap(),
            "--val-ratio",
            "0.5",
            "-q",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names = Vec::new();
    for split in ["train_set.csv", "val_set.csv"] {
        let text = std::fs::read_to_string(data.join(split)).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], "path,len");
        assert_eq!(rows.len(), 2, "{split}: {text}");
        names.push(rows[1].to_string());
    }
    names.sort();
    assert_eq!(names, vec!["person_a/clip1,48", "person_a/clip2,48"]);
    for clip in ["clip1", "clip2"] {
        let crops = data.join("crop_images_DB/person_a").join(clip);
        let maps = data.join("face_parsing_images_DB/person_a").join(clip);
        assert_eq!(std::fs::read_dir(&crops).unwrap().count(), 48);
        assert_eq!(std::fs::read_dir(&maps).unwrap().count(), 48);
        let img = image::open(crops.join("00010.jpg")).unwrap();
        assert_eq!((img.width(), img.height()), (224, 224));
        let m: ndarray::Array2<u8> = ndarray_npy::read_npy(maps.join("00010.npy")).unwrap();
        assert_eq!(m.shape(), &[224, 224]);
        // Every region is there, the eyes in the upper half, the mouth in the lower half.
        let rows_of = |label: u8| -> Vec<usize> {
            m.indexed_iter()
                .filter(|(_, &v)| v == label)
                .map(|((y, _), _)| y)
                .collect()
        };
        for label in 0..=10u8 {
            assert!(!rows_of(label).is_empty(), "{clip}: label {label} missing");
        }
        let mean = |v: Vec<usize>| v.iter().sum::<usize>() as f64 / v.len() as f64;
        assert!(
            mean(rows_of(4)) < 112.0 && mean(rows_of(8)) > 112.0,
            "{clip}"
        );
    }
    // A rerun skips both; a fasking pretraining run reads the maps.
    let o = marlin(
        &[
            "prepare",
            d.join("raw").to_str().unwrap(),
            "--out",
            data.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("0 of 2 inputs written") && stderr(&o).contains("2 skipped"),
        "{}",
        stderr(&o)
    );
    // With the gradient penalty on (gp_weight 10): it is reported per epoch.
    let cfg = tiny_config(d, "fasking");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("gp_weight: 0.0", "gp_weight: 10.0")).unwrap();
    let out = d.join("run");
    let rows = pretrain(&cfg, &data, &out, 2);
    assert_eq!(rows.len(), 2);
    let header = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(
        header.starts_with("epoch,")
            && header
                .lines()
                .next()
                .unwrap()
                .ends_with(",train_gp,data_wait_s")
    );
    for r in &rows {
        let gp: f64 = r.rsplit(',').nth(1).unwrap().parse().unwrap();
        assert!(gp > 0.0 && gp.is_finite(), "{r}");
    }
}

#[test]
fn reconstruct_draws_mask_and_reconstruction_panels() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model");
    let cfg = fx.join("tiny_a.yaml");
    // `marlin reconstruct sample_face.mp4 EXTRA... --out d/OUT`
    let reconstruct = |out: &str, extra: &[&str]| {
        let out = d.join(out);
        let mut args = vec!["reconstruct", sample.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        marlin(&args, &[])
    };
    // No weights: original | masked, every frame, Fasking at 0.9 keeps 156 of 1568 tokens.
    let o = reconstruct("a", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("156 of 1568 tokens visible"));
    let img = image::open(d.join("a/sample_face_reconstruction.png")).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 224, 16 * 224));
    assert_eq!(
        video_shape(&d.join("a/sample_face_reconstruction.mp4")),
        (16, 448, 224)
    );
    // With a full checkpoint: three panels.
    let full = fx.join("tiny_a.full.pt");
    let o = reconstruct(
        "b",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--weights",
            full.to_str().unwrap(),
            "--strategy",
            "tube",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(d.join("b/sample_face_reconstruction.png")).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 32, 16 * 32));
    // An encoder-only file cannot reconstruct: one line saying so.
    let encoder = fx.join("tiny_a.encoder.pt");
    let o = reconstruct(
        "c",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--weights",
            encoder.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("needs a full checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_perfect_prediction_reconstructs_the_ground_truth_panel() {
    use burn::tensor::{Tensor, TensorData};
    use marlin::backend::Cpu;
    use marlin::masking::{make_mask, Grid, RngDraws, Strategy};
    use marlin::model::{MaskIndices, Part};
    use marlin::train::data::ClipSettings;
    use marlin::train::samples::sample_image;
    use marlin::{Marlin, MarlinConfig};
    let cfg = MarlinConfig::from_yaml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny_a.yaml"),
    )
    .unwrap();
    let dev = Default::default();
    let m = Marlin::<Cpu>::init(&cfg, &[Part::Encoder], 0, &dev);
    let (t, s) = (16, 32);
    let clip: Vec<f32> = (0..3 * t * s * s)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let grid = Grid {
        tubelets: 8,
        grid_h: 4,
        grid_w: 4,
        patch: 8,
    };
    let visible = make_mask(Strategy::Random, 0.75, &[], &grid, &mut RngDraws::new(1));
    let idx = MaskIndices::from_bools(&visible, 1).unwrap();
    let x = Tensor::<Cpu, 5>::from_data(TensorData::new(clip.clone(), [1, 3, t, s, s]), &dev);
    let target: Vec<f32> = m.target(x, &idx).into_data().into_vec().unwrap();
    let settings = ClipSettings {
        clip_frames: t,
        sample_rate: 2,
        img_size: s,
        grid,
        tubelet: 2,
        strategy: Strategy::Random,
        mask_ratio: 0.75,
    };
    for frame in [0, 5, 15] {
        let img = sample_image(&clip, &visible, Some(&target), &settings, frame);
        // Enlarged for viewing: every pixel becomes a 4x4 block of its colour.
        let big = marlin::train::samples::enlarge_small(&img, 128);
        assert_eq!(big.dimensions(), (4 * img.width(), 4 * img.height()));
        for (x, y, p) in img.enumerate_pixels() {
            for (dx, dy) in [(0, 0), (3, 3), (1, 2)] {
                assert_eq!(big.get_pixel(4 * x + dx, 4 * y + dy), p);
            }
        }
        assert_eq!(marlin::train::samples::enlarge_small(&big, 128), big);
        for y in 0..s as u32 {
            for x in 0..s as u32 {
                assert_eq!(
                    img.get_pixel(x, y),
                    img.get_pixel(x + 2 * s as u32, y),
                    "frame {frame} ({x}, {y})"
                );
            }
        }
    }
}

#[test]
fn config_prints_a_released_config_that_reads_back() {
    let o = marlin(&["config", "marlin_vit_small_ytf"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let back = marlin::MarlinConfig::from_yaml_str(&text, "stdout").unwrap();
    assert_eq!(
        back,
        marlin::MarlinConfig::from_name("marlin_vit_small_ytf").unwrap()
    );
    let o = marlin(&["config", "marlin_vit_tiny"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// The library call under `marlin reconstruct`: without a model, the mask alone (two panels
/// per frame); with the full tiny model, three panels and a prediction.
#[test]
fn reconstruct_from_the_library() {
    use marlin::backend::Cpu;
    use marlin::model::Part;
    use marlin::train::reconstruct::{reconstruct, ReconstructOptions};
    use marlin::{Marlin, MarlinConfig};
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cfg = MarlinConfig::from_yaml_file(&fx.join("model/tiny_a.yaml")).unwrap();
    let video = fx.join("video/h264_100.mp4");
    let dev = Default::default();
    let opts = ReconstructOptions {
        strategy: "random".parse().unwrap(),
        ..Default::default()
    };
    let r = reconstruct::<Cpu>(&video, &cfg, None, &opts, &dev).unwrap();
    assert!(!r.predicted);
    assert_eq!(r.panels.len(), cfg.clip_frames);
    let tokens = (cfg.img_size / cfg.patch_size).pow(2) * cfg.clip_frames / cfg.tubelet_size;
    assert_eq!(r.visible.len(), tokens);
    assert_eq!(r.visible.iter().filter(|&&v| v).count(), tokens / 10);
    let (w2, h) = (r.panels[0].width(), r.panels[0].height());
    assert_eq!(w2, 2 * h, "original | masked");
    let (m, _) = Marlin::<Cpu>::load_file(
        &cfg,
        &fx.join("model/tiny_a.full.pt"),
        &[Part::Encoder, Part::Decoder],
        &dev,
    )
    .unwrap();
    let r = reconstruct(&video, &cfg, Some(&m), &opts, &dev).unwrap();
    assert!(r.predicted);
    assert_eq!(
        r.panels[0].width(),
        3 * h,
        "original | masked | reconstruction"
    );
    let bad = ReconstructOptions {
        mask_ratio: 1.0,
        ..Default::default()
    };
    let e = reconstruct(&video, &cfg, Some(&m), &bad, &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--mask-ratio"), "{e}");
}

/// A run whose losses stop being finite (a learning rate of 1e30 blows the weights up) skips
/// those updates with a warning each, stops after five in a row with one line saying what to
/// do, and leaves a whole checkpoint of the last finished epoch.
#[test]
fn non_finite_losses_stop_the_run_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data = d.join("data");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sample_face.mp4");
    dataset(
        &data,
        &sample,
        &[("a/0", 0), ("a/1", 8)],
        &[("b/0", 16)],
        20,
    );
    let cfg = tiny_config(d, "random");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("base: 0.2", "base: 1.0e+30")
        .replace("warmup: 0.001", "warmup: 1.0e+30")
        .replace("min: 0.01", "min: 1.0e+30");
    std::fs::write(&cfg, text).unwrap();
    let out = d.join("run");
    let args = pretrain_args(&cfg, &data, &out, 20);
    let o = marlin(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let warnings = err
        .lines()
        .filter(|l| l.contains("non-finite loss"))
        .count();
    assert!(warnings >= 5, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("5 steps in a row") && last.contains("the last checkpoint is intact"),
        "{err}"
    );
    assert!(last.contains("--resume"), "{last}");
    let epochs = metric_rows(&out).len();
    assert!(epochs < 20, "ran all {epochs} epochs");
    if epochs > 0 {
        read_safetensors_file(&out.join("checkpoint.safetensors")).unwrap();
    }
}
