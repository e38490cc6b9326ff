//! Scale-out: shards (`--shard`, Slurm job arrays, Kubernetes Indexed Jobs) cover every input
//! once and give the unsharded outputs byte for byte; a re-run completes only what is missing;
//! the manifest lists everything.

use crate::common::{extract_args, marlin, pattern_video, stderr};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// 9 short videos of different lengths in two folders, and one file that is not a video.
fn dataset(root: &Path) -> PathBuf {
    let d = root.join("videos");
    for (i, sub) in ["a", "a", "a", "a", "b", "b", "b", "b", "b"]
        .iter()
        .enumerate()
    {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        pattern_video(
            &d.join(sub).join(format!("v{i}.mp4")),
            "224x224",
            32 + 3 * i,
        );
    }
    std::fs::write(d.join("b").join("broken.mp4"), b"not a video").unwrap();
    d
}

/// Every .npy under `dir` (relative path -> bytes, modification time).
fn outputs(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "npy"))
        .map(|e| {
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            let meta = e.metadata().unwrap();
            (
                rel,
                (std::fs::read(e.path()).unwrap(), meta.modified().unwrap()),
            )
        })
        .collect()
}

fn run(input: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut args = extract_args(extra, out);
    args.push(input.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    marlin(&args, env)
}

#[test]
fn shards_cover_every_input_once_and_equal_one_run_then_the_manifest_lists_everything() {
    let t = tempfile::tempdir().unwrap();
    let input = dataset(t.path());
    let whole = t.path().join("whole");
    let o = run(&input, &whole, &[], &[]);
    assert_eq!(o.status.code(), Some(1), "one input fails: {}", stderr(&o));
    let reference = outputs(&whole);
    assert_eq!(reference.len(), 9);

    for how in ["option", "slurm", "kubernetes"] {
        let out = t.path().join(how);
        let mut owner: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = Vec::new();
        for i in 0..3usize {
            let (is, n) = (i.to_string(), "3");
            let shard = format!("{i}/3");
            let (extra, env): (Vec<&str>, Vec<(&str, &str)>) = match how {
                "option" => (vec!["--shard", &shard], vec![]),
                // An array --array=5-9:2 -> tasks 5, 7, 9 are shards 0, 1, 2.
                "slurm" => (
                    vec![],
                    vec![
                        ("SLURM_ARRAY_TASK_ID", ["5", "7", "9"][i]),
                        ("SLURM_ARRAY_TASK_MIN", "5"),
                        ("SLURM_ARRAY_TASK_MAX", "9"),
                        ("SLURM_ARRAY_TASK_STEP", "2"),
                    ],
                ),
                _ => (
                    vec![],
                    vec![
                        ("JOB_COMPLETION_INDEX", is.as_str()),
                        ("MARLIN_SHARD_COUNT", n),
                    ],
                ),
            };
            let before: BTreeSet<String> = outputs(&out).into_keys().collect();
            let o = run(&input, &out, &extra, &env);
            let err = stderr(&o);
            let first = err.lines().next().unwrap_or_default();
            assert!(
                first.starts_with(&format!("shard {i}/3 (from ")),
                "{how}: {err}"
            );
            for k in outputs(&out).into_keys().filter(|k| !before.contains(k)) {
                assert!(
                    owner.insert(k.clone(), i).is_none(),
                    "{how}: {k} written twice"
                );
            }
            let list = out.join(format!("failures.shard-{i}-of-3.json"));
            if list.exists() {
                failed.push(std::fs::read_to_string(&list).unwrap());
            }
            assert!(!out.join("failures.json").exists());
        }
        assert_eq!(
            failed.len(),
            1,
            "{how}: the broken file fails in exactly one shard"
        );
        assert!(failed[0].contains("broken.mp4"), "{}", failed[0]);
        let got = outputs(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{how}"
        );
        for (k, (bytes, _)) in &got {
            assert!(
                *bytes == reference[k].0,
                "{how}: {k} differs from the unsharded run"
            );
        }
        let per_shard: BTreeSet<usize> = owner.values().copied().collect();
        assert!(
            per_shard.len() >= 2,
            "{how}: the split put everything in one shard: {owner:?}"
        );
    }

    // A shard killed mid-run: its output is missing; running every shard again redoes that one
    // input alone.
    let out = t.path().join("option");
    let before = outputs(&out);
    let (lost, _) = before.iter().nth(4).unwrap();
    std::fs::remove_file(out.join(lost)).unwrap();

    // The manifest shows it missing, the broken file failed, the rest done.
    let m = marlin(
        &["manifest", out.to_str().unwrap(), input.to_str().unwrap()],
        &[],
    );
    assert_eq!(m.status.code(), Some(1), "{}", stderr(&m));
    let text = String::from_utf8_lossy(&m.stdout);
    assert!(
        text.contains("10 inputs: 8 done, 1 failed, 1 missing"),
        "{text}"
    );
    let csv = std::fs::read_to_string(out.join("manifest.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "{csv}");
    let lost_stem = Path::new(lost).file_stem().unwrap().to_str().unwrap();
    let missing = std::fs::read_to_string(out.join("missing.txt")).unwrap();
    assert_eq!(missing.lines().count(), 1);
    assert!(missing.contains(&format!("{lost_stem}.mp4")), "{missing}");
    let row = |name: &str| csv.lines().find(|l| l.contains(name)).unwrap().to_string();
    assert!(row("broken.mp4").contains(",failed,"), "{csv}");
    assert!(
        row("broken.mp4").contains("broken.mp4:"),
        "the error names the file: {csv}"
    );
    assert!(
        row(&format!("{lost_stem}.mp4")).contains(",missing,"),
        "{csv}"
    );
    assert!(
        row("v0.mp4").contains(",done,") && row("v0.mp4").contains(",1x32,"),
        "{csv}"
    );

    std::thread::sleep(std::time::Duration::from_millis(20));
    for i in 0..3 {
        let shard = format!("{i}/3");
        run(&input, &out, &["--shard", &shard], &[]);
    }
    let after = outputs(&out);
    assert_eq!(after.len(), 9);
    for (k, (bytes, mtime)) in &after {
        assert!(*bytes == reference[k].0, "{k}");
        if k == lost {
            assert!(*mtime > before[k].1, "{k} was not redone");
        } else {
            assert_eq!(*mtime, before[k].1, "{k} was written again");
        }
    }
    let m = marlin(
        &["manifest", out.to_str().unwrap(), input.to_str().unwrap()],
        &[],
    );
    assert!(String::from_utf8_lossy(&m.stdout).contains("9 done, 1 failed, 0 missing"));
    assert!(!out.join("missing.txt").exists());
}

#[test]
fn a_bad_shard_is_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    let input = t.path().join("none");
    std::fs::create_dir_all(&input).unwrap();
    for (extra, env, want) in [
        (
            vec!["--shard", "3/3"],
            vec![],
            "--shard 3/3: shard 3 of 3 does not exist",
        ),
        (vec!["--shard", "x"], vec![], "--shard x: expected I/N"),
        (
            vec![],
            vec![("JOB_COMPLETION_INDEX", "0")],
            "JOB_COMPLETION_INDEX=0 without MARLIN_SHARD_COUNT",
        ),
        (
            vec![],
            vec![("SLURM_ARRAY_TASK_ID", "2")],
            "SLURM_ARRAY_TASK_ID=2 without SLURM_ARRAY_TASK_COUNT",
        ),
    ] {
        let o = run(&input, &t.path().join("out"), &extra, &env);
        assert!(!o.status.success(), "{}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    }
}

#[test]
fn two_cpu_workers_in_one_process_give_the_same_outputs_as_one() {
    let t = tempfile::tempdir().unwrap();
    let input = dataset(t.path());
    let (one, two) = (t.path().join("one"), t.path().join("two"));
    let a = run(&input, &one, &[], &[]);
    let b = run(&input, &two, &["--workers", "2", "--batch-size", "3"], &[]);
    assert_eq!(a.status.code(), b.status.code(), "{}", stderr(&b));
    let (a, b) = (outputs(&one), outputs(&two));
    assert_eq!(a.len(), 9);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, (bytes, _)) in &a {
        assert!(*bytes == b[k].0, "{k} differs with 2 workers");
    }
    let failures = std::fs::read_to_string(two.join("failures.json")).unwrap();
    assert!(failures.contains("broken.mp4"), "{failures}");
}

#[test]
fn several_decoder_threads_give_the_same_outputs_as_one() {
    let t = tempfile::tempdir().unwrap();
    let input = dataset(t.path());
    let (one, three) = (t.path().join("one"), t.path().join("three"));
    let a = run(&input, &one, &["--decoders", "1"], &[]);
    let b = run(
        &input,
        &three,
        &["--decoders", "3", "--batch-size", "5"],
        &[],
    );
    assert_eq!(a.status.code(), b.status.code(), "{}", stderr(&b));
    let (a, b) = (outputs(&one), outputs(&three));
    assert_eq!(a.len(), 9);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, (bytes, _)) in &a {
        assert!(*bytes == b[k].0, "{k} differs with 3 decoders");
    }
    let failures = std::fs::read_to_string(three.join("failures.json")).unwrap();
    assert!(failures.contains("broken.mp4"), "{failures}");
    let zero = run(&input, &t.path().join("zero"), &["--decoders", "0"], &[]);
    assert!(
        stderr(&zero).contains("and --decoders must be at least 1"),
        "{}",
        stderr(&zero)
    );
}
