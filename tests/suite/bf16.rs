//! `--precision bf16` on the CPU: features within the stated tolerance of f32 (and of the
//! peer's fp32 fixture), or, on a CPU without AVX-512 BF16, or without AMX and with bf16 dot
//! products no faster than f32 FMAs (where bf16 is slower than f32), one note and exactly the
//! f32 features. Run through the binary: the precision is a per-process setting.

use crate::common::{extract, fixtures, read, stderr};

/// Max abs diff allowed between bf16 and f32 features (LayerNorm outputs of unit scale; the
/// peer's own bf16 autocast differs from its fp32 by about 1.2e-2 on ViT-B).
const TOL: f32 = 5e-2;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn bf16_features_are_within_tolerance_of_f32_or_fall_back_with_a_note() {
    let t = tempfile::tempdir().unwrap();
    let video = fixtures().join("h264_143.mp4");
    let v = video.to_str().unwrap();
    let (f32_dir, bf16_dir) = (t.path().join("f32"), t.path().join("bf16"));
    let a = extract(&[v, "--keep-seq"], &f32_dir);
    assert!(a.status.success(), "{}", stderr(&a));
    // `marlin extract --keep-seq --precision bf16` of the video into `dir` with `envs` set;
    // `notes` drops `--quiet` so the notes reach stderr.
    let bf16_extract = |dir: &std::path::Path, notes: bool, envs: &[(&str, &str)]| {
        let mut args = crate::common::extract_args(&[v, "--keep-seq", "--precision", "bf16"], dir);
        if notes {
            args.retain(|a| a != "--quiet");
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::common::marlin(&args, envs)
    };
    // The bf16 kernels themselves, also on a CPU without AMX (where they are not the default).
    let b = bf16_extract(
        &bf16_dir,
        false,
        &[(marlin::kernels::BF16_WITHOUT_AMX, "1")],
    );
    assert!(b.status.success(), "{}", stderr(&b));
    let (x, y) = (
        read(&f32_dir.join("h264_143.npy")),
        read(&bf16_dir.join("h264_143.npy")),
    );
    assert_eq!(x.shape(), y.shape());
    let (x, y): (Vec<f32>, Vec<f32>) = (x.iter().copied().collect(), y.iter().copied().collect());
    let worst = crate::common::max_abs_diff(&y, &x).diff;
    let cos = cosine(&x, &y);
    eprintln!("bf16 vs f32: max abs diff {worst:.3e}, cosine {cos:.6}");
    // A CPU without the instructions (or MARLIN_NO_BF16): one note, then exactly f32.
    let c_dir = t.path().join("fallback");
    let c = bf16_extract(&c_dir, true, &[("MARLIN_NO_BF16", "1")]);
    assert!(c.status.success(), "{}", stderr(&c));
    assert!(
        stderr(&c)
            .contains("note: this CPU has no AVX-512 BF16 instructions: computing in f32 instead"),
        "{}",
        stderr(&c)
    );
    let z: Vec<f32> = read(&c_dir.join("h264_143.npy")).iter().copied().collect();
    assert_eq!(
        crate::common::max_abs_diff(&z, &x).diff,
        0.0,
        "the fallback computes in f32"
    );
    // A CPU with AVX-512 BF16 but no AMX whose bf16 dot products are no faster than its f32
    // FMAs (an Intel core without AMX; MARLIN_NO_AMX and MARLIN_SLOW_BF16_DOTS force it): bf16
    // would be slower than f32, so one note and exactly the f32 features.
    let no_bf16 = stderr(&b).contains("no AVX-512 BF16");
    let no_bf16_note = "note: this CPU has no AVX-512 BF16 instructions: computing in f32 instead";
    let slow_note = "note: this CPU has no AMX and its bf16 dot products are no faster than f32 \
                     FMAs: bf16 is slower than f32 here, computing in f32 instead";
    let d_dir = t.path().join("slow_dots");
    let d = bf16_extract(
        &d_dir,
        true,
        &[
            ("MARLIN_NO_AMX", "1"),
            (marlin::kernels::SLOW_BF16_DOTS, "1"),
        ],
    );
    assert!(d.status.success(), "{}", stderr(&d));
    let note = if no_bf16 { no_bf16_note } else { slow_note };
    assert!(stderr(&d).contains(note), "{}", stderr(&d));
    let z: Vec<f32> = read(&d_dir.join("h264_143.npy")).iter().copied().collect();
    assert_eq!(
        crate::common::max_abs_diff(&z, &x).diff,
        0.0,
        "without AMX or fast dot products, bf16 falls back to f32"
    );
    // No AMX, the dot products as this CPU has them: bf16 where they outrun f32 FMAs (Zen 4:
    // the faster path, no note), otherwise the note and f32, as the probe of this process says.
    let e_dir = t.path().join("no_amx");
    let e = bf16_extract(&e_dir, true, &[("MARLIN_NO_AMX", "1")]);
    assert!(e.status.success(), "{}", stderr(&e));
    let z: Vec<f32> = read(&e_dir.join("h264_143.npy")).iter().copied().collect();
    let diff = crate::common::max_abs_diff(&z, &x).diff;
    if !no_bf16 && marlin::kernels::peak::bf16_dots_outrun_fmas() {
        assert!(!stderr(&e).contains("note:"), "{}", stderr(&e));
        assert!(
            diff > 0.0 && diff <= TOL,
            "no AMX, fast dots: max abs diff {diff}"
        );
        assert!(cosine(&x, &z) >= 0.9995, "cosine {}", cosine(&x, &z));
    } else {
        assert!(stderr(&e).contains(note), "{}", stderr(&e));
        assert_eq!(
            diff, 0.0,
            "without AMX or fast dot products, bf16 falls back to f32"
        );
    }
    if no_bf16 {
        assert_eq!(worst, 0.0, "the fallback computes in f32");
        return;
    }
    assert!(worst > 0.0, "bf16 changed nothing: not computed in bf16?");
    assert!(worst <= TOL, "max abs diff {worst}");
    assert!(cos >= 0.9995, "cosine {cos}");
}
