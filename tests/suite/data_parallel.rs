//! Data-parallel `pretrain` and `finetune` launched as torchrun does (RANK, WORLD_SIZE,
//! MASTER_ADDR, MASTER_PORT), two processes on 127.0.0.1 with Gloo: 2 ranks at batch 1 end
//! with the weights of one process at batch 2; rank 0 alone writes the run folder; a 2-rank
//! checkpoint resumes with 1 rank and with 2; a killed rank ends the other with one line naming
//! it; ranks started differently stop at once. Needs ffmpeg and libgloo-dev.

use crate::common;

use common::*;
use marlin::model::weights::read_safetensors_file;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The tiny fixture model with a schedule that moves the weights in a few steps.
fn tiny_config(dir: &Path) -> PathBuf {
    let base = std::fs::read_to_string(repo().join("tests/fixtures/model/tiny_a.yaml")).unwrap();
    let cfg = base
        .replace("mask_strategy: fasking", "mask_strategy: random")
        .replace("base: 0.00015", "base: 0.2")
        .replace("warmup: 1.0e-06", "warmup: 0.05")
        .replace("min: 1.0e-05", "min: 0.01")
        .replace("warmup_epochs: 40", "warmup_epochs: 1");
    let p = dir.join("tiny.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// `DATA/crop_images_DB/<name>/NNN.jpg`: 20 frames of the sample face from `start`, 64x64.
fn dataset(root: &Path, train: &[(&str, usize)], val: &[(&str, usize)]) {
    let video = repo().join("assets/sample_face.mp4");
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
            "20",
            dir.join("%03d.jpg").to_str().unwrap(),
        ]);
    }
    for (split, list) in [("train", train), ("val", val)] {
        let rows: Vec<String> = list.iter().map(|(n, _)| format!("{n},20")).collect();
        std::fs::write(
            root.join(format!("{split}_set.csv")),
            format!("path,len\n{}\n", rows.join("\n")),
        )
        .unwrap();
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `marlin` as rank `rank` of `world` (torchrun's variables), one compute thread.
fn rank_cmd(rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_marlin"));
    c.args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Two ranks to the end; rank r runs `args(r)`. Their outputs.
fn two_ranks(args: impl Fn(usize) -> Vec<String>) -> [Output; 2] {
    let port = free_port();
    let children: Vec<Child> = (0..2)
        .map(|r| rank_cmd(r, 2, port, &args(r)).spawn().unwrap())
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    [outs[0].clone(), outs[1].clone()]
}

fn assert_ok(o: &[Output]) {
    for (r, o) in o.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", stderr(o));
    }
}

fn pretrain_args(cfg: &Path, data: &Path, out: &Path, epochs: usize, batch: usize) -> Vec<String> {
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
        &batch.to_string(),
        "--dist-timeout",
        "60",
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One process (one compute thread) to the end.
fn single(args: &[String]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_marlin"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// The largest difference between two weight files, over every tensor of the first.
fn weights_diff(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (
        read_safetensors_file(a).unwrap(),
        read_safetensors_file(b).unwrap(),
    );
    assert_eq!(
        wa.keys().collect::<Vec<_>>(),
        wb.keys().collect::<Vec<_>>(),
        "the same tensors in {} and {}",
        a.display(),
        b.display()
    );
    // Checked helpers: a NaN or infinite weight in either file fails the test (a plain
    // `fold(0.0, f32::max)` skips NaN and would score it 0).
    let per_tensor: Vec<f32> = wa
        .iter()
        .map(|(k, v)| {
            common::try_max_abs_diff(&wb[k].data, &v.data)
                .unwrap_or_else(|e| panic!("{k} in {} and {}: {e}", a.display(), b.display()))
                .diff
        })
        .collect();
    common::max_abs(&per_tensor)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn two_ranks_pretrain_like_one_process_at_the_global_batch_and_resume_with_any_world() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data = d.join("data");
    dataset(
        &data,
        &[("a/0", 0), ("a/1", 6), ("a/2", 12), ("a/3", 18)],
        &[("b/0", 24), ("b/1", 30)],
    );
    let cfg = tiny_config(d);
    let model = |out: &Path| out.join("model.safetensors");

    // One process at batch 2: 2 steps per epoch, 3 epochs.
    let whole = d.join("whole");
    single(&pretrain_args(&cfg, &data, &whole, 3, 2));

    // Two ranks at batch 1, each layer's gradients all-reduced on their own while the
    // backward goes on (--bucket-mb 0; the runs below: one bucket of the tiny model). Rank 1
    // is given its own run folder: it must write nothing there.
    let dp = d.join("dp");
    let rank1_out = d.join("dp_rank1");
    let o = two_ranks(|r| {
        let out = if r == 0 { &dp } else { &rank1_out };
        with(pretrain_args(&cfg, &data, out, 3, 1), &["--bucket-mb", "0"])
    });
    assert_ok(&o);
    assert!(!rank1_out.exists(), "rank 1 wrote {}", rank1_out.display());
    let diff = weights_diff(&model(&whole), &model(&dp));
    eprintln!("2 ranks x batch 1 vs 1 process x batch 2 after 6 steps (the training engine): max |dw| {diff:.2e}");
    assert!(diff <= 1e-5, "2-rank weights differ by {diff}");
    // The metrics are the global batch's: the same training losses.
    let rows = |out: &Path| -> Vec<Vec<f64>> {
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').take(10).map(|v| v.parse().unwrap()).collect())
            .collect()
    };
    let (rw, rd) = (rows(&whole), rows(&dp));
    assert_eq!(rw.len(), 3);
    for (a, b) in rw.iter().zip(&rd) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{a:?} vs {b:?}");
        }
    }

    // A 2-rank run of 2 epochs (one run folder, as on a shared filesystem)...
    let cut = d.join("cut");
    assert_ok(&two_ranks(|_| pretrain_args(&cfg, &data, &cut, 2, 1)));
    // (2 epochs are not 3: training moves the weights well beyond the tolerance.)
    let moved = weights_diff(&model(&whole), &model(&cut));
    assert!(moved > 1e-3, "epoch 3 moved the weights by {moved} only");
    let cut1 = d.join("cut1");
    copy_dir(&cut, &cut1);
    // ... resumed by one process (the run keeps its global batch of 2)...
    let o = single(&with(
        pretrain_args(&cfg, &data, &cut1, 3, 7),
        &["--resume"],
    ));
    assert!(stderr(&o).contains("resumed at epoch 2"), "{}", stderr(&o));
    let diff1 = weights_diff(&model(&whole), &model(&cut1));
    // ... and by two ranks again.
    let o = two_ranks(|_| with(pretrain_args(&cfg, &data, &cut, 3, 1), &["--resume"]));
    assert_ok(&o);
    let diff2 = weights_diff(&model(&whole), &model(&cut));
    eprintln!("resumed from a 2-rank checkpoint: 1 rank {diff1:.2e}, 2 ranks {diff2:.2e}");
    assert!(diff1 <= 1e-5 && diff2 <= 1e-5, "{diff1} / {diff2}");

    // Ranks started differently stop at once, each with one line.
    let bad = d.join("bad");
    let o = two_ranks(|r| {
        with(
            pretrain_args(&cfg, &data, &bad, 3, 1),
            &["--seed", &r.to_string()],
        )
    });
    for (r, o) in o.iter().enumerate() {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {e}");
        assert!(
            e.contains("rank 1's run (config, epochs, global batch, seed, data, resume) differs from rank 0's"),
            "rank {r}: {e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "rank {r}: {e}");
    }
}

/// burn's step (the GPUs' path) averages its gradients across ranks the same way.
#[test]
fn two_ranks_on_burns_step_pretrain_like_one_process_at_the_global_batch() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data = d.join("data");
    dataset(
        &data,
        &[("a/0", 0), ("a/1", 6), ("a/2", 12), ("a/3", 18)],
        &[("b/0", 24)],
    );
    let cfg = tiny_config(d);
    let burn = |args: Vec<String>| with(args, &["--step", "burn"]);
    let (whole, dp) = (d.join("whole"), d.join("dp"));
    single(&burn(pretrain_args(&cfg, &data, &whole, 2, 2)));
    assert_ok(&two_ranks(|_| burn(pretrain_args(&cfg, &data, &dp, 2, 1))));
    assert!(
        !common::safetensors_header(&dp.join("checkpoint.safetensors")).contains("engine_updates"),
        "burn's step wrote the checkpoint"
    );
    let diff = weights_diff(
        &whole.join("model.safetensors"),
        &dp.join("model.safetensors"),
    );
    eprintln!("burn's step, 2 ranks x batch 1 vs 1 process x batch 2: max |dw| {diff:.2e}");
    assert!(diff <= 1e-5, "2-rank weights differ by {diff}");
}

#[test]
fn a_killed_rank_ends_the_other_with_one_line_and_the_run_resumes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data = d.join("data");
    dataset(&data, &[("a/0", 0), ("a/1", 6)], &[("b/0", 24)]);
    let cfg = tiny_config(d);
    let out = d.join("run");
    let port = free_port();
    // Long enough for rank 1 to be killed mid-run (an epoch takes about 0.1 s here).
    let epochs = 40;
    let args = pretrain_args(&cfg, &data, &out, epochs, 1);
    let mut rank0 = rank_cmd(0, 2, port, &args).spawn().unwrap();
    let mut rank1 = rank_cmd(1, 2, port, &args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Once an epoch is checkpointed, rank 1 dies (SIGKILL).
    let t0 = Instant::now();
    while !out.join("metrics.csv").is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed = Instant::now();
    // Rank 0 stops well within its timeout (60 s), with one line naming rank 1.
    let o = loop {
        if rank0.try_wait().unwrap().is_some() {
            break rank0.wait_with_output().unwrap();
        }
        if killed.elapsed() > Duration::from_secs(90) {
            rank0.kill().unwrap();
            panic!("rank 0 still running 90 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let e = stderr(&o);
    eprintln!(
        "rank 0 stopped {:.1} s after the kill: {e}",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("rank 1 is gone"), "{e}");
    assert!(e.contains("--resume"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // The last checkpoint is whole and the run goes on from it, here as one process.
    read_safetensors_file(&out.join("checkpoint.safetensors")).unwrap();
    let rows = |out: &Path| {
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .count()
            - 1
    };
    let done = rows(&out);
    assert!(
        done < epochs,
        "rank 0 finished ({done} epochs) before rank 1 was killed"
    );
    let o = single(&with(
        pretrain_args(&cfg, &data, &out, epochs, 1),
        &["--resume"],
    ));
    assert!(
        stderr(&o).contains(&format!("resumed at epoch {done}")),
        "{}",
        stderr(&o)
    );
    assert_eq!(rows(&out), epochs);
}

/// 8 videos of 16 frames, 64x64: grey noise, every second one with a red square (label 1).
/// Splits: 4 train, 2 val, 2 test.
fn red_squares(d: &Path) {
    std::fs::create_dir_all(d.join("videos")).unwrap();
    let mut rows = Vec::new();
    for i in 0..8 {
        let pos = i % 2;
        let mut vf = "noise=alls=30:allf=t".to_string();
        if pos == 1 {
            vf += &format!(",drawbox=x={}:y=20:w=16:h=16:color=red:t=fill", 4 + 5 * i);
        }
        let name = format!("videos/v{i}.mp4");
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "color=c=0x808080:size=64x64:rate=25",
            "-vf",
            &vf,
            "-frames:v",
            "16",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            d.join(&name).to_str().unwrap(),
        ]);
        rows.push(format!("{name},{pos}"));
    }
    for (split, range) in [("train", 0..4), ("val", 4..6), ("test", 6..8)] {
        std::fs::write(
            d.join(format!("{split}.csv")),
            format!("path,red_square\n{}\n", rows[range].join("\n")),
        )
        .unwrap();
    }
}

#[test]
fn two_ranks_finetune_like_one_process_at_the_global_batch() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    red_squares(d);
    let m = repo().join("tests/fixtures/model");
    let args = |out: &Path, batch: usize| -> Vec<String> {
        [
            "finetune",
            "--labels",
            d.to_str().unwrap(),
            "--config",
            m.join("tiny_a.yaml").to_str().unwrap(),
            "--weights",
            m.join("tiny_a.encoder.pt").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lr",
            "1e-3",
            "--max-epochs",
            "1",
            "--batch-size",
            &batch.to_string(),
            "--dist-timeout",
            "60",
            "-q",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = d.join("whole");
    single(&args(&whole, 2));
    let dp = d.join("dp");
    let rank1_out = d.join("dp_rank1");
    // Each layer's gradients all-reduced on their own while the backward goes on.
    let o = two_ranks(|r| {
        let out = if r == 0 { &dp } else { &rank1_out };
        with(args(out, 1), &["--bucket-mb", "0"])
    });
    assert_ok(&o);
    assert!(!rank1_out.exists(), "rank 1 wrote {}", rank1_out.display());
    // Rank 0 alone prints the test table.
    assert!(String::from_utf8_lossy(&o[0].stdout).contains("test:"));
    assert!(
        o[1].stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o[1].stdout)
    );
    let best = |out: &Path| out.join("best.safetensors");
    let diff = weights_diff(&best(&whole), &best(&dp));
    eprintln!("finetune, 2 ranks x batch 1 vs 1 process x batch 2, 2 steps: max |dw| {diff:.2e}");
    assert!(diff <= 1e-5, "2-rank weights differ by {diff}");
    // The steps moved the weights: one step fewer (batch 4, one step) ends elsewhere.
    let one_step = d.join("one_step");
    single(&args(&one_step, 4));
    let moved = weights_diff(&best(&whole), &best(&one_step));
    assert!(moved > 1e-4, "{moved}");
}

/// `marlin finetune` on the training engine (`--step auto` on the CPU) trains as burn's step
/// does: the same losses per epoch and the same best weights; a model the engine does not
/// cover (layer scale) stays on burn's step with a note under auto, and is one line under
/// `--step engine`.
#[test]
fn finetune_on_the_engine_equals_burns_step() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    red_squares(d);
    let m = repo().join("tests/fixtures/model");
    let args = |out: &Path, step: &str, model: &str, weights: &str| -> Vec<String> {
        [
            "finetune",
            "--labels",
            d.to_str().unwrap(),
            "--config",
            m.join(format!("{model}.yaml")).to_str().unwrap(),
            "--weights",
            m.join(weights).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lr",
            "1e-3",
            "--max-epochs",
            "2",
            "--batch-size",
            "2",
            "--step",
            step,
        ]
        .map(String::from)
        .to_vec()
    };
    let (engine, burn) = (d.join("engine"), d.join("burn"));
    single(&args(&engine, "auto", "tiny_a", "tiny_a.encoder.pt"));
    single(&args(&burn, "burn", "tiny_a", "tiny_a.encoder.pt"));
    let losses = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    // The seconds the steps waited for their clips (decoded one batch ahead), per epoch.
    let csv = std::fs::read_to_string(engine.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("epoch,") && csv.lines().next().unwrap().ends_with(",data_wait_s"));
    for row in csv.lines().skip(1) {
        let wait: f64 = row.rsplit(',').next().unwrap().parse().unwrap();
        assert!(wait >= 0.0, "{row}");
    }
    let (le, lb) = (losses(&engine), losses(&burn));
    assert_eq!(le.len(), 2, "{le:?}");
    for (e, b) in le.iter().zip(&lb) {
        assert!(
            (e - b).abs() <= 1e-4,
            "train loss: engine {le:?}, burn {lb:?}"
        );
    }
    let best = |out: &Path| out.join("best.safetensors");
    let diff = weights_diff(&best(&engine), &best(&burn));
    eprintln!("finetune, engine vs burn's step, 2 epochs x 2 steps: max |dw| {diff:.2e}");
    assert!(
        diff <= 1e-4,
        "the engine's weights differ from burn's by {diff}"
    );

    let ls = |step: &str| {
        Command::new(env!("CARGO_BIN_EXE_marlin"))
            .args(args(
                &d.join(format!("ls_{step}")),
                step,
                "tiny_ls",
                "tiny_ls.full.pt",
            ))
            .output()
            .unwrap()
    };
    let o = ls("auto");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("note: the training engine does not cover layer scale"),
        "{}",
        stderr(&o)
    );
    let o = ls("engine");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("layer scale") && err.trim().lines().count() == 1,
        "{err}"
    );
}

/// The binary carries the Gloo shim and opens it when a CPU launch first needs it (the ranks
/// above): the binary itself does not list libgloo, so it starts (and extracts) on a machine
/// where Gloo is not installed. (It lists libstdc++, the C++ runtime OpenH264 needs: every
/// Debian/Ubuntu system has it, apt itself links it, and manylinux allows it.)
#[cfg(target_os = "linux")]
#[test]
fn the_binary_starts_without_libgloo() {
    let Ok(out) = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_marlin")])
        .output()
    else {
        eprintln!("no readelf (binutils): skipped");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        out.status.success() && needed.iter().any(|l| l.contains("libc.so")),
        "readelf -d did not list the binary's libraries:\n{text}"
    );
    assert!(
        needed.iter().all(|l| !l.contains("libgloo")),
        "the binary needs {needed:?}"
    );
    // Nothing of CUDA, Vulkan or FFmpeg either: all opened at run time, or run as programs.
    for lib in [
        "libcuda",
        "libcudnn",
        "libcublas",
        "libnvrtc",
        "libvulkan",
        "libav",
    ] {
        assert!(
            needed.iter().all(|l| !l.contains(lib)),
            "the binary needs {lib}: {needed:?}"
        );
    }
}
