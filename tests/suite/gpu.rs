//! The GPU backends against marlin-pytorch's fixtures and the CPU backend, in every precision
//! the device has: one suite for every CubeCL runtime of the build.
//!
//! - `gpu::vulkan::` (`--features vulkan`): the first Vulkan adapter; in CI Mesa's lavapipe, a
//!   software GPU on the CPU that runs the same CubeCL kernels (fusion, autotune, the f32
//!   custom-op matmul, the blocked autodiff attention) through SPIR-V.
//! - `gpu::cuda::` (`--features cuda`): CUDA device 0, run on an NVIDIA GPU by `bench/gpu.sh`.
//!
//! The precision is a per-process setting: each test walks the precisions in turn, and the
//! tests of one device hold a lock so they never interleave.
//!
//! Tolerances (max abs diff of features, whose entries are of order 1):
//! - fp32: 1e-4 against the peer's fp32 (as on the CPU), 1e-4 against the CPU backend.
//! - tf32: 2e-2 against fp32, cosine >= 0.9999 (TF32 keeps 10 of f32's 23 mantissa bits).
//! - bf16: as the CPU's bf16 test: at most twice the peer's own bf16-autocast distance from
//!   its fp32 plus 1e-2, cosine >= 0.9999.
//!
//! A precision the device does not have (TF32 off CUDA, bf16 on an adapter without bf16
//! arithmetic) computes in f32, as the CLI does with its note: the test says so and checks the
//! precisions that run.

// `!(d <= tol)` on purpose: a NaN fails it.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::common;
use crate::model_parity::{
    cosine, fixture, io, load_on, mask_indices, max_abs_diff, tensor, vitb2, vitb2_on, CASES, TOL,
};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use marlin::backend::set_precision;
use marlin::backend::{Cpu, DeviceSpec};
use marlin::kernels::Precision;
use marlin::model::weights::read_safetensors_file;
use marlin::model::Part;

const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];
const TF32_TOL: f32 = 2e-2;

/// One test of the device at a time: the precision is the process's.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

/// The largest of `xs`, NaN if any is NaN (so `!(worst <= tol)` fails on a NaN).
fn worst(xs: impl IntoIterator<Item = f32>) -> f32 {
    xs.into_iter().fold(0f32, |m, x| {
        if m.is_nan() || x.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

/// The precisions `spec` runs as asked (the others are printed with the device's note).
fn precisions(spec: DeviceSpec) -> Vec<Precision> {
    let mut run = Vec::new();
    for p in PRECISIONS {
        match set_precision(Some(p), spec) {
            (got, _) if got == p => run.push(p),
            (got, note) => eprintln!(
                "{spec} {p}: computes in {got} ({}); covered by the {got} check",
                note.unwrap_or_default()
            ),
        }
    }
    set_precision(None, spec);
    run
}

/// The tiny fixtures (four configs, keep_seq and pooled, the reconstruction) and the released
/// width (768 wide, 1568 tokens, 2 blocks) on `B` against the peer and the CPU backend.
fn features_match_the_peer_and_the_cpu<B: Backend>(spec: DeviceSpec, dev: &B::Device) {
    let (cfg, vio) = vitb2();
    let peer_bf16 = read_safetensors_file(&fixture("vitb2.bf16.safetensors")).unwrap();
    let fp32 = &vio["features"].data;
    let (cpu_model, cpu_clip) = vitb2_on::<Cpu>(&cfg, &Default::default());
    let cpu: Vec<f32> = cpu_model
        .extract_features(cpu_clip, false)
        .into_data()
        .into_vec()
        .unwrap();
    let peer_bf16_gap = common::max_abs_diff(&peer_bf16["features"].data, fp32).diff;
    let mut failures = Vec::new();
    let run = precisions(spec);
    assert!(run.contains(&Precision::F32), "{spec}: fp32 always runs");
    for p in run {
        set_precision(Some(p), spec);
        let tol = match p {
            Precision::F32 => TOL,
            Precision::Tf32 => TF32_TOL,
            Precision::Bf16 => 2.0 * peer_bf16_gap + 1e-2,
        };
        for case in CASES {
            let io = io(case);
            let model = load_on::<B>(case, &format!("{case}.full.pt"), &[Part::Decoder], dev);
            let clip: Tensor<B, 5> = tensor(&io["clip"], dev);
            let d_seq = max_abs_diff(
                model.extract_features(clip.clone(), true),
                &io["features_seq"],
            );
            let d_pool = max_abs_diff(
                model
                    .extract_features(clip.clone(), false)
                    .squeeze_dim::<2>(1),
                &io["features_pooled"],
            );
            let pred = model.forward_indices(clip, &mask_indices(&io)).unwrap();
            let d_fwd = max_abs_diff(pred, &io["forward"]);
            eprintln!("{spec} {p} {case}: keep_seq {d_seq:.2e} pooled {d_pool:.2e} reconstruction {d_fwd:.2e}");
            let w = worst([d_seq, d_pool, d_fwd]);
            if !(w <= tol) {
                failures.push(format!("{p} {case}: {d_seq} {d_pool} {d_fwd} > {tol}"));
            }
        }
        let (model, clip) = vitb2_on::<B>(&cfg, dev);
        let pooled = host(model.extract_features(clip.clone(), false));
        let seq = host(model.extract_features(clip, true));
        let rows: Vec<f32> = (0..2)
            .flat_map(|b| (0..1568).step_by(49).map(move |t| (b, t)))
            .flat_map(|(b, t)| seq[(b * 1568 + t) * 768..(b * 1568 + t + 1) * 768].to_vec())
            .collect();
        let d_pool = common::max_abs_diff(&pooled, fp32).diff;
        let d_seq = common::max_abs_diff(&rows, &vio["seq_rows"].data).diff;
        let d_cpu = common::max_abs_diff(&pooled, &cpu).diff;
        let cos = cosine(&pooled, fp32);
        eprintln!(
            "{spec} {p} ViT-B width: pooled {d_pool:.2e} keep_seq {d_seq:.2e} vs the peer's fp32, \
             {d_cpu:.2e} vs the CPU backend, cosine {cos:.6} (the peer's bf16 autocast: \
             {peer_bf16_gap:.2e}, cosine {:.6})",
            cosine(&peer_bf16["features"].data, fp32)
        );
        let cpu_tol = if p == Precision::F32 { TOL } else { tol };
        if !(worst([d_pool, d_seq]) <= tol
            && d_cpu <= cpu_tol
            && (p == Precision::F32 || cos >= 0.9999))
        {
            failures.push(format!(
                "{p} ViT-B width: {d_pool} {d_seq} {d_cpu} cos {cos}"
            ));
        }
    }
    set_precision(None, spec);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One pretraining step (critic, then generator) of tiny_a on `B`'s autodiff against the
/// peer's step (tests/fixtures/train/step.safetensors): losses and updated weights within
/// 1e-4 in fp32 (the CPU path's tolerance); in TF32 and bf16 the losses within 2e-2 (relative)
/// and the weights within 1e-3 (one AdamW step moves a weight by about lr = 1.5e-4, so this
/// pins little more than that the step ran: the numbers are printed for the record).
fn a_pretraining_step_matches_the_peer<B: Backend>(spec: DeviceSpec, dev: &B::Device) {
    let want = read_safetensors_file(&crate::pretrain_step::fx("train/step.safetensors")).unwrap();
    let mut failures = Vec::new();
    for p in precisions(spec) {
        set_precision(Some(p), spec);
        let (model, clip, idx) = crate::pretrain_step::tiny_a_batch_on::<Autodiff<B>>(dev);
        let (t, got) = crate::pretrain_step::fixture_step(model, clip, &idx);
        let worst_loss = worst(
            crate::pretrain_step::loss_pairs(&got, &want)
                .into_iter()
                .map(|(_, ours, peer)| {
                    let d = (ours - peer).abs();
                    (if p == Precision::F32 {
                        d
                    } else {
                        d / peer.abs().max(1e-3)
                    }) as f32
                }),
        );
        let diffs = crate::pretrain_step::weight_diffs(&t.model().to_state_dict(), &want);
        let wmax = worst(diffs.iter().map(|(_, d)| *d));
        let n = diffs.len();
        let mut sorted = diffs.clone();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
        eprintln!(
            "{spec} {p} step: largest weight differences {:?}",
            &sorted[..3.min(n)]
        );
        eprintln!("{spec} {p} step: losses {worst_loss:.2e}, {n} updated tensors {wmax:.2e}");
        // Where the worst weight differs: the peer's reconstruction gradient there, against
        // the tensor's largest (a sign flip of a near-zero gradient, or a wrong gradient).
        if let Some((key, _)) = sorted.first() {
            let sd = t.model().to_state_dict();
            let w =
                common::max_abs_diff(&sd.tensors[key].data, &want[&format!("after.{key}")].data);
            if let Some(g) = want.get(&format!("grad.{key}")) {
                eprintln!(
                    "{spec} {p} step: {key}[{}] ours {} peer {}; peer's reconstruction gradient there {:.3e}, max |grad| {:.3e}",
                    w.index, w.ours, w.peer, g.data[w.index], common::max_abs(&g.data)
                );
            }
        }
        let (lt, wt) = if p == Precision::F32 {
            (1e-4, 1e-4)
        } else {
            (2e-2, 1e-3)
        };
        if !(worst_loss <= lt && wmax <= wt && n >= 40) {
            failures.push(format!("{p}: losses {worst_loss}, weights {wmax} ({n})"));
        }
    }
    set_precision(None, spec);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The face parser's networks through burn's ops on `B` against TensorFlow Lite's outputs, at
/// the CPU test's tolerances (landmarks 1e-3 px, presence logit and person mask 1e-4).
fn face_parser_nets_match_tflite<B: Backend>(spec: DeviceSpec, dev: &B::Device) {
    set_precision(Some(Precision::F32), spec);
    crate::face_parser::nets_match_tflite::<B>(dev);
    set_precision(None, spec);
}

/// The kernels door's products on `B` against the CPU backend's, in f32: the Linear product
/// (batched rows of one weight, with and without bias) and attention (blocked, at the
/// default scale and another), on the shapes of the tiny fixtures and the released width:
/// 1e-4 (a failing model test says which model; this says which product).
fn check_products<B: Backend>(spec: DeviceSpec, dev: &B::Device) {
    use burn::tensor::TensorData;
    set_precision(Some(Precision::F32), spec);
    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect()
    }
    fn t<B2: Backend, const D: usize>(
        shape: [usize; D],
        seed: usize,
        dev: &B2::Device,
    ) -> Tensor<B2, D> {
        let n: usize = shape.iter().product();
        Tensor::from_data(TensorData::new(vals(n, seed), shape), dev)
    }
    let cpu: burn::tensor::Device<Cpu> = Default::default();
    let (gk, ck) = (marlin::kernels::of::<B>(), marlin::kernels::of::<Cpu>());
    let mut bad = Vec::new();
    for [b, n, i, o] in [
        [2, 50, 96, 64],
        [1, 1568, 32, 96],
        [2, 393, 768, 2304],
        [3, 7, 5, 3],
    ] {
        for bias in [false, true] {
            let g = gk.linear(
                t::<B, 3>([b, n, i], 1, dev),
                t::<B, 2>([i, o], 2, dev),
                bias.then(|| t::<B, 1>([o], 3, dev)),
            );
            let c = ck.linear(
                t::<Cpu, 3>([b, n, i], 1, &cpu),
                t::<Cpu, 2>([i, o], 2, &cpu),
                bias.then(|| t::<Cpu, 1>([o], 3, &cpu)),
            );
            assert_eq!(g.dims(), [b, n, o]);
            let d = common::max_abs_diff(&host(g), &host(c)).diff;
            eprintln!("{spec} linear [{b}, {n}, {i}] x [{i}, {o}] bias {bias}: {d:.2e}");
            if !(d <= TOL) {
                bad.push(format!("linear {b}x{n}x{i}x{o} bias {bias}: {d}"));
            }
        }
    }
    for [b, n, d, h] in [[2, 50, 96, 4], [2, 392, 32, 4], [1, 1568, 768, 12]] {
        for scale in [((d / h) as f32).powf(-0.5), 0.2] {
            let g = gk.attention(t::<B, 3>([b, n, 3 * d], 4, dev), h, scale);
            let c = ck.attention(t::<Cpu, 3>([b, n, 3 * d], 4, &cpu), h, scale);
            assert_eq!(g.dims(), [b, n, d]);
            let diff = common::max_abs_diff(&host(g), &host(c)).diff;
            eprintln!("{spec} attention [{b}, {n}, 3 x {d}] {h} heads scale {scale}: {diff:.2e}");
            if !(diff <= TOL) {
                bad.push(format!(
                    "attention {b}x{n}x{d} {h} heads scale {scale}: {diff}"
                ));
            }
        }
    }
    // The exact (erf) GELU and its gradient under autodiff against the closed form
    // Φ(x) + x·φ(x) in f64, on x in [-4, 4].
    {
        let x = (t::<Autodiff<B>, 3>([2, 50, 96], 5, dev) * 8.0).require_grad();
        let y = marlin::kernels::of::<Autodiff<B>>().gelu(x.clone());
        let grads = y.clone().sum().backward();
        let gx = host(x.grad(&grads).expect("x requires its gradient"));
        let xs = host(x.inner());
        let ys = host(y.inner());
        let phi = |v: f64| (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let cdf = |v: f64| 0.5 * (1.0 + erf(v / std::f64::consts::SQRT_2));
        let want_y: Vec<f32> = xs
            .iter()
            .map(|&v| (v as f64 * cdf(v as f64)) as f32)
            .collect();
        let want_g: Vec<f32> = xs
            .iter()
            .map(|&v| (cdf(v as f64) + v as f64 * phi(v as f64)) as f32)
            .collect();
        let (dy, dg) = (
            common::max_abs_diff(&ys, &want_y).diff,
            common::max_abs_diff(&gx, &want_g).diff,
        );
        eprintln!("{spec} gelu: forward {dy:.2e}, gradient {dg:.2e}");
        if !(dy <= 1e-5 && dg <= 1e-5) {
            bad.push(format!("gelu: forward {dy}, gradient {dg}"));
        }
    }
    set_precision(None, spec);
    assert!(
        bad.is_empty(),
        "{} products off the CPU's: {bad:#?}",
        gk.name()
    );
}

/// erf in f64 (Abramowitz and Stegun 7.1.26 is too coarse for a 1e-5 check: a series below 3,
/// the continued fraction's asymptote above).
fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x < 3.0 {
        // Maclaurin series: 2/√π Σ (-1)^k x^(2k+1) / (k! (2k+1)).
        let (mut term, mut sum, mut k) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -x * x / k;
            sum += term / (2.0 * k + 1.0);
        }
        return sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    // erfc by its continued fraction (Lentz), accurate far below 1e-10 at x >= 3.
    let (mut f, mut c, mut d) = (x, x, 0.0);
    for n in 1..200 {
        let a = n as f64 / 2.0;
        d = 1.0 / (x + a * d);
        c = x + a / c;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    1.0 - (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
}

/// The face networks' layers one by one on `B` against the CPU backend, on the same inputs
/// (a failing network test says which network; this says which layer): 1e-5.
fn check_face_layers<B: Backend>(dev: &B::Device) {
    use burn::tensor::activation::{hard_swish, sigmoid};
    use burn::tensor::TensorData;
    use marlin::face::layers::{global_mean, upsample2, Conv, Upconv};
    fn data(shape: [usize; 4], seed: usize) -> TensorData {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919) % 1009) as f32 / 504.5 - 1.0)
            .collect();
        TensorData::new(v, shape)
    }
    fn on<B2: Backend>(d: &TensorData, dev: &B2::Device) -> Tensor<B2, 4> {
        Tensor::from_data(d.clone(), dev)
    }
    fn bias<B2: Backend>(n: usize, dev: &B2::Device) -> Tensor<B2, 1> {
        let v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 - 0.5).collect();
        Tensor::from_data(TensorData::new(v, [n]), dev)
    }
    let cpu: burn::tensor::Device<Cpu> = Default::default();
    let x = data([2, 8, 16, 16], 1);
    let w_up = data([8, 4, 2, 2], 2);
    let w_dw = data([8, 1, 5, 5], 3);
    let w_pw = data([4, 8, 1, 1], 4);
    let w_pw24 = data([24, 8, 1, 1], 6);
    let gate = data([2, 8, 1, 1], 5);
    let w_3 = data([16, 8, 3, 3], 7);
    type Layer<B2> =
        fn(Tensor<B2, 4>, &[Tensor<B2, 4>], &burn::tensor::Device<B2>) -> Tensor<B2, 4>;
    fn run<B2: Backend>(
        f: Layer<B2>,
        x: &TensorData,
        ws: &[&TensorData],
        dev: &B2::Device,
    ) -> Vec<f32> {
        let ws: Vec<Tensor<B2, 4>> = ws.iter().map(|w| on::<B2>(w, dev)).collect();
        host(f(on::<B2>(x, dev), &ws, dev))
    }
    macro_rules! layer {
        ($name:expr, $ws:expr, |$x:ident, $w:ident, $d:ident| $body:expr) => {{
            fn f<B2: Backend>(
                $x: Tensor<B2, 4>,
                $w: &[Tensor<B2, 4>],
                $d: &B2::Device,
            ) -> Tensor<B2, 4> {
                let _ = (&$w, &$d);
                $body
            }
            let a = run::<Cpu>(f::<Cpu>, &x, $ws, &cpu);
            let b = run::<B>(f::<B>, &x, $ws, dev);
            let d = common::max_abs_diff(&b, &a).diff;
            eprintln!("face layer {}: {d:.2e}", $name);
            ($name, d)
        }};
    }
    let results = [
        layer!("hard_swish", &[], |x, w, d| hard_swish(x)),
        layer!("sigmoid", &[], |x, w, d| sigmoid(x)),
        layer!("global_mean", &[], |x, w, d| global_mean(x)),
        layer!("gate product", &[&gate], |x, w, d| x * w[0].clone()),
        layer!("upsample2", &[], |x, w, d| upsample2(x)),
        layer!("transposed conv 2x2/2", &[&w_up], |x, w, d| Upconv {
            weight: w[0].clone(),
            bias: bias::<B2>(4, d),
        }
        .forward(x)),
        layer!("depthwise 5x5/2 same", &[&w_dw], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(8, d),
            stride: 2,
            groups: 8,
            same: true,
        }
        .forward(x)),
        layer!("pointwise 1x1 8 -> 24", &[&w_pw24], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(24, d),
            stride: 1,
            groups: 1,
            same: false,
        }
        .forward(x)),
        // Dense convolutions: the door's product over patches in f32 on a GPU (burn's
        // convolution is TF32 on CUDA): padding passed on (same, 1 each side), padding made
        // by hand (same at stride 2: one row/column after), none (MTCNN's).
        layer!("dense 3x3 same", &[&w_3], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(16, d),
            stride: 1,
            groups: 1,
            same: true,
        }
        .forward(x)),
        layer!("dense 3x3/2 same", &[&w_3], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(16, d),
            stride: 2,
            groups: 1,
            same: true,
        }
        .forward(x)),
        layer!("dense 3x3 valid", &[&w_3], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(16, d),
            stride: 1,
            groups: 1,
            same: false,
        }
        .forward(x)),
        layer!("pointwise 1x1", &[&w_pw], |x, w, d| Conv {
            weight: w[0].clone(),
            bias: bias::<B2>(4, d),
            stride: 1,
            groups: 1,
            same: false,
        }
        .forward(x)),
    ];
    let bad: Vec<_> = results.iter().filter(|(_, d)| !(*d <= 1e-5)).collect();
    assert!(bad.is_empty(), "layers off the CPU's: {bad:?}");
}

/// `marlin extract --device DEVICE` of the shared samples (two face videos, pooled and
/// keep_seq, batched across videos) equal to `--device cpu` within 1e-4.
fn extract_equals_the_cpu(device: &str) {
    let Some(dir) = common::samples() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let videos = ["cropped01.mp4", "cropped02.mp4"].map(|v| dir.join(v).display().to_string());
    for seq in [false, true] {
        let mut outs = Vec::new();
        for d in ["cpu", device] {
            let out = t.path().join(format!("{d}-{seq}"));
            let mut extra: Vec<&str> = videos.iter().map(String::as_str).collect();
            extra.extend(["--device", d, "--batch-size", "3"]);
            if seq {
                extra.push("--keep-seq");
            }
            let o = common::extract(&extra, &out);
            assert!(o.status.success(), "--device {d}: {}", common::stderr(&o));
            outs.push(out);
        }
        for v in ["cropped01", "cropped02"] {
            let (a, b) = (
                common::read(&outs[0].join(format!("{v}.npy"))),
                common::read(&outs[1].join(format!("{v}.npy"))),
            );
            assert_eq!(a.shape(), b.shape(), "{v}");
            let w = common::assert_close(
                &format!("{v} keep_seq={seq}, {device} vs cpu"),
                b.as_slice().unwrap(),
                a.as_slice().unwrap(),
                TOL,
            );
            eprintln!(
                "extract {v} keep_seq={seq} {:?}: {device} vs cpu {:.2e}",
                a.shape(),
                w.diff
            );
        }
    }
}

/// The GPU suite on one backend: `$B` its type, `$spec` its [`DeviceSpec`], `$dev` its device.
macro_rules! gpu_suite {
    ($B:ty, $spec:expr, $dev:expr, $cli:expr) => {
        use super::*;

        fn dev() -> burn::tensor::Device<$B> {
            $dev
        }

        #[test]
        fn features_match_the_peer_and_the_cpu_in_every_precision() {
            let _one = lock();
            features_match_the_peer_and_the_cpu::<$B>($spec, &dev());
        }

        #[test]
        fn face_parser_networks_match_tflite() {
            let _one = lock();
            face_parser_nets_match_tflite::<$B>($spec, &dev());
        }

        #[test]
        fn products_match_the_cpu() {
            let _one = lock();
            check_products::<$B>($spec, &dev());
        }

        #[test]
        fn face_layers_match_the_cpu() {
            let _one = lock();
            // In f32: CUDA's default precision is TF32 (as PyTorch's `allow_tf32`), 1e-3 off.
            set_precision(Some(Precision::F32), $spec);
            check_face_layers::<$B>(&dev());
            set_precision(None, $spec);
        }

        /// On lavapipe this found burn's GELU gradient (the tanh approximation's derivative
        /// under the erf GELU's forward), which every CubeCL autodiff backend had: the kernels
        /// door now differentiates the exact GELU itself.
        #[test]
        fn a_pretraining_step_matches_the_peer_in_every_precision() {
            let _one = lock();
            a_pretraining_step_matches_the_peer::<$B>($spec, &dev());
        }

        #[test]
        fn reconstruction_gradients_match_the_peer() {
            let _one = lock();
            set_precision(Some(Precision::F32), $spec);
            let n = crate::pretrain_step::reconstruction_gradients_match::<Autodiff<$B>>(&dev());
            set_precision(None, $spec);
            assert!(n > 40, "compared {n} gradients");
        }

        #[test]
        fn extract_of_the_samples_equals_the_cpu() {
            // Its own process: no lock needed.
            extract_equals_the_cpu($cli);
        }
    };
}

#[cfg(feature = "cuda")]
mod cuda {
    gpu_suite!(
        marlin::backend::Gpu,
        DeviceSpec::Cuda(0),
        burn::backend::cuda::CudaDevice::new(0),
        "cuda"
    );

    /// The CUDA engine (cuBLASLt, cuDNN or our attention, the NVRTC kernels, CUDA graphs)
    /// against the peer's fixtures and the host twin of its schedule. Each check prints
    /// `parity NAME VALUE` lines that bench/gpu_results.py collects.
    mod engine {
        use super::super::*;
        use marlin::engine::host::HostEngine;
        use marlin::engine::{features, EncoderWeights, FeatureEngine};
        use marlin::kernels::cuda::CudaEngine;
        use marlin::{Marlin, MarlinConfig};

        fn cuda(m: &Marlin<Cpu>, p: Precision) -> CudaEngine {
            let (e, note) = CudaEngine::new(EncoderWeights::of_model(m), 0, p)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
            if let Some(n) = note {
                eprintln!("{p}: {n}");
            }
            eprintln!("{}", e.describe());
            e
        }

        fn tol(p: Precision, peer_bf16_gap: f32) -> f32 {
            match p {
                Precision::F32 => TOL,
                Precision::Tf32 => TF32_TOL,
                Precision::Bf16 => 2.0 * peer_bf16_gap + 1e-2,
            }
        }

        fn vitb2_clips() -> (Marlin<Cpu>, Vec<f32>) {
            let (cfg, _) = vitb2();
            let (model, clip) = vitb2_on::<Cpu>(&cfg, &Default::default());
            (model, host(clip))
        }

        #[test]
        fn features_match_the_peer_in_every_precision() {
            let _one = lock();
            let (_, vio) = vitb2();
            let peer_bf16 = read_safetensors_file(&fixture("vitb2.bf16.safetensors")).unwrap();
            let fp32 = &vio["features"].data;
            let gap = common::max_abs_diff(&peer_bf16["features"].data, fp32).diff;
            let mut failures = Vec::new();
            for p in PRECISIONS {
                for case in CASES {
                    let io = io(case);
                    let cfg =
                        MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
                    let (m, _) = Marlin::<Cpu>::load_file(
                        &cfg,
                        &fixture(&format!("{case}.full.pt")),
                        &[Part::Encoder],
                        &Default::default(),
                    )
                    .unwrap();
                    let e = cuda(&m, p);
                    let per: usize = io["clip"].shape[1..].iter().product();
                    let c: Vec<&[f32]> = io["clip"].data.chunks(per).collect();
                    let (seq, _) = features(&e, &c, true).unwrap();
                    let (pooled, _) = features(&e, &c, false).unwrap();
                    let d_seq = common::max_abs_diff(&seq, &io["features_seq"].data).diff;
                    let d_pool = common::max_abs_diff(&pooled, &io["features_pooled"].data).diff;
                    println!("parity engine_{p}_{case}_seq {d_seq:.3e}");
                    println!("parity engine_{p}_{case}_pooled {d_pool:.3e}");
                    let w = worst([d_seq, d_pool]);
                    if !(w <= tol(p, gap)) {
                        failures.push(format!("{p} {case}: {d_seq} {d_pool}"));
                    }
                }
                let (m, clip) = vitb2_clips();
                let e = cuda(&m, p);
                let c: Vec<&[f32]> = clip.chunks(clip.len() / 2).collect();
                let (pooled, _) = features(&e, &c, false).unwrap();
                let (seq, _) = features(&e, &c, true).unwrap();
                let rows: Vec<f32> = (0..2)
                    .flat_map(|b| (0..1568).step_by(49).map(move |t| (b, t)))
                    .flat_map(|(b, t)| seq[(b * 1568 + t) * 768..(b * 1568 + t + 1) * 768].to_vec())
                    .collect();
                let twin = HostEngine::new(EncoderWeights::of_model(&m), Precision::F32);
                let (cpu, _) = features(&twin, &c, false).unwrap();
                let d_pool = common::max_abs_diff(&pooled, fp32).diff;
                let d_seq = common::max_abs_diff(&rows, &vio["seq_rows"].data).diff;
                let d_cpu = common::max_abs_diff(&pooled, &cpu).diff;
                println!("parity engine_{p}_vitb2_pooled {d_pool:.3e}");
                println!("parity engine_{p}_vitb2_seq {d_seq:.3e}");
                println!("parity engine_{p}_vitb2_vs_cpu {d_cpu:.3e}");
                eprintln!(
                    "{p} ViT-B width: pooled {d_pool:.2e} keep_seq {d_seq:.2e} vs the peer's fp32 \
                     (the peer's bf16 autocast: {gap:.2e}), {d_cpu:.2e} vs the host twin, \
                     cosine {:.6}",
                    cosine(&pooled, fp32)
                );
                let w = worst([d_pool, d_seq]);
                // bf16: no further from the peer's fp32 than the peer's own bf16 autocast.
                let limit = if p == Precision::Bf16 {
                    1.05 * gap
                } else {
                    tol(p, gap)
                };
                if !(w <= limit) {
                    failures.push(format!("{p} ViT-B width: {d_pool} {d_seq} > {limit}"));
                }
            }
            println!("parity peer_bf16_autocast_vitb2 {gap:.3e}");
            assert!(failures.is_empty(), "{failures:#?}");
        }

        /// Each attention kernel the engine can pick, on the released width, against the host
        /// twin in f32: cuDNN, the tensor-core kernels (bf16, tf32) and the CUDA-core ones.
        #[test]
        fn every_attention_kernel_matches_the_host_twin() {
            let _one = lock();
            let (m, clip) = vitb2_clips();
            let c: Vec<&[f32]> = clip.chunks(clip.len() / 2).collect();
            let twin = HostEngine::new(EncoderWeights::of_model(&m), Precision::F32);
            let (want, _) = features(&twin, &c, true).unwrap();
            let mut failures = Vec::new();
            for (p, kind, limit) in [
                (Precision::Bf16, "cudnn", 1e-1),
                (Precision::Bf16, "mma", 1e-1),
                (Precision::Bf16, "simt", 1e-1),
                (Precision::Tf32, "mma", 5e-2),
                (Precision::Tf32, "simt", 5e-2),
                (Precision::F32, "simt", 1e-4),
            ] {
                // Read when the engine is built (the tests hold the device lock).
                std::env::set_var("MARLIN_ATTENTION", kind);
                let e = cuda(&m, p);
                std::env::remove_var("MARLIN_ATTENTION");
                let (got, _) = features(&e, &c, true).unwrap();
                let d = common::max_abs_diff(&got, &want).diff;
                let name = format!("{:?}", e.attention()).to_lowercase();
                println!("parity attention_{p}_{name} {d:.3e}");
                if !(d <= limit) {
                    failures.push(format!("{p} {name}: {d} > {limit}"));
                }
            }
            assert!(failures.is_empty(), "{failures:#?}");
        }

        /// Batches of 1, 2 and 3 give each clip the same features, a graph's replay the same
        /// as the eager first pass, and a batch too large for the GPU one line naming it.
        #[test]
        fn batches_replays_and_out_of_memory() {
            let _one = lock();
            let (m, clip) = vitb2_clips();
            let per = clip.len() / 2;
            let e = cuda(&m, Precision::Bf16);
            let one: Vec<&[f32]> = vec![&clip[..per]];
            let (first, _) = features(&e, &one, false).unwrap();
            for _ in 0..3 {
                let (again, _) = features(&e, &one, false).unwrap();
                assert_eq!(first, again, "a replay differs from the first pass");
            }
            let three: Vec<&[f32]> = vec![&clip[per..], &clip[..per], &clip[per..]];
            let (f3, _) = features(&e, &three, false).unwrap();
            let d = common::max_abs_diff(&f3[768..1536], &first).diff;
            println!("parity batch_invariance_bf16 {d:.3e}");
            assert!(d <= 1e-2, "clip 0 alone vs in a batch of 3: {d}");
            assert_eq!(&f3[..768], &f3[1536..], "one clip twice in a batch");
            let huge: Vec<&[f32]> = vec![&clip[..per]; 100_000];
            let err = e.submit(&huge, false).unwrap_err().to_string();
            assert!(
                err.contains("out of GPU memory at --batch-size 100000"),
                "{err}"
            );
            // The engine still works after that.
            let (after, _) = features(&e, &one, false).unwrap();
            assert_eq!(after, first);
        }
    }

    /// The training engine's step on the GPU (cuBLASLt products, train.cu's kernels and f32
    /// attention) against the peer's step and the host twin, in fp32 and tf32. Prints
    /// `parity NAME VALUE` lines for bench/gpu_results.py.
    mod train_engine {
        use super::super::*;
        use crate::pretrain_step::{fx, loss_pairs, tiny_a_batch_on, weight_diffs};
        use crate::train_engine::ADV;
        use marlin::backend::CpuAutodiff;
        use marlin::engine::train::{host_step, Activations, PretrainStep, StepShape};
        use marlin::kernels::cuda::CudaTrainOps;
        use marlin::model::load::to_f32_vec;

        #[test]
        fn the_training_engines_step_matches_the_peer_and_the_host() {
            let _one = lock();
            let (model, clip, idx) = tiny_a_batch_on::<CpuAutodiff>(&Default::default());
            let clip = to_f32_vec(clip);
            let cfg = model.config.clone();
            let sd = model.to_state_dict();
            let b = idx.batch;
            let shape = StepShape {
                batch: b,
                visible: idx.visible.len() / b,
                masked: idx.masked.len() / b,
            };
            let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
            // The host twin's gradients of one generator update, to compare tensor by tensor.
            let (hstep, mut hops) = host_step(&cfg, &sd, shape, ADV).unwrap();
            hstep.upload_batch(&mut hops, &clip, &idx).unwrap();
            hstep.generator_gradients(&mut hops).unwrap();
            let host_grads = hstep.gradients(&mut hops).unwrap();
            let mut failures = Vec::new();
            for p in [Precision::F32, Precision::Tf32] {
                let tol = if p == Precision::F32 { 1e-4 } else { 1e-2 };
                let mut ops = CudaTrainOps::new(0, p).unwrap_or_else(|e| panic!("{p}: {e}"));
                eprintln!("{ops:?}");
                // Gradients first (no update), then a whole step from the same weights; the
                // CUDA steps recompute the LayerNorm and GELU outputs (as a run's do), the host
                // twin keeps them.
                let acts = Activations::of(&ops);
                let step = PretrainStep::new_in(&cfg, &sd, shape, ADV, acts).unwrap();
                step.load(&mut ops).unwrap();
                step.upload_batch(&mut ops, &clip, &idx).unwrap();
                step.generator_gradients(&mut ops).unwrap();
                let grads = step.gradients(&mut ops).unwrap();
                let mut worst_grad = 0f32;
                for (k, h) in &host_grads.tensors {
                    let g = &grads.tensors[k];
                    let scale = common::max_abs(&h.data).max(1e-2);
                    let d = common::max_abs_diff(&g.data, &h.data).diff / scale;
                    // NaN sticks (f32::max would drop it).
                    worst_grad = if d.is_nan() || worst_grad.is_nan() {
                        f32::NAN
                    } else {
                        worst_grad.max(d)
                    };
                }
                println!("parity train_engine_grads_{p} {worst_grad:.3e}");
                if !(worst_grad <= tol) {
                    failures.push(format!("{p}: gradients vs the host twin {worst_grad}"));
                }
                let mut step = PretrainStep::new_in(&cfg, &sd, shape, ADV, acts).unwrap();
                step.load(&mut ops).unwrap();
                step.upload_batch(&mut ops, &clip, &idx).unwrap();
                let got = step.step(&mut ops, 1.5e-4).unwrap();
                let mut worst_loss = 0f64;
                for (name, ours, peer) in loss_pairs(&got, &want) {
                    eprintln!("{p} {name}: engine {ours:.6}, PyTorch {peer:.6}");
                    let d = (ours - peer).abs();
                    worst_loss = if d.is_nan() || worst_loss.is_nan() {
                        f64::NAN
                    } else {
                        worst_loss.max(d)
                    };
                }
                let after = step.state_dict(&mut ops).unwrap();
                let diffs = weight_diffs(&after, &want);
                let worst_w = diffs.iter().map(|(_, d)| *d).collect::<Vec<f32>>();
                let worst_w = common::max_abs(&worst_w);
                println!("parity train_engine_step_loss_{p} {worst_loss:.3e}");
                println!("parity train_engine_step_weights_{p} {worst_w:.3e}");
                if !(worst_loss <= tol as f64 && worst_w <= tol && diffs.len() > 40) {
                    failures.push(format!(
                        "{p}: losses {worst_loss}, weights {worst_w} over {} tensors",
                        diffs.len()
                    ));
                }
            }
            assert!(failures.is_empty(), "{failures:#?}");
        }

        /// The fine-tuning step on CUDA against its host twin (which equals burn's autodiff
        /// fine-tuning in the CPU suite): logits, every gradient, the weights after two Adam
        /// updates, in fp32 (1e-4) and tf32 (1e-2, relative to each tensor's scale).
        #[test]
        fn the_finetuning_step_matches_the_host() {
            use crate::finetune_engine::{classifier, targets};
            use marlin::engine::finetune::{FinetuneStep, HeadLoss};
            let _one = lock();
            let (model, clip_t, cfg) = classifier();
            let b = clip_t.dims()[0];
            let clip = to_f32_vec(clip_t);
            let sd = model.to_state_dict("start");
            let kind = HeadLoss::BinaryCrossEntropy;
            let y = targets(kind, b);
            let mut hops = marlin::engine::host_train::HostTrainOps::default();
            let mut hstep = FinetuneStep::new(&cfg, &sd, b, kind).unwrap();
            hstep.load(&mut hops).unwrap();
            hstep.upload_clips(&mut hops, &clip).unwrap();
            let hlogits = hstep.forward(&mut hops).unwrap();
            let (_, dl) = kind.loss_and_grad(&hlogits, &y, hstep.classes);
            hstep.backward(&mut hops, &dl).unwrap();
            let hgrads = hstep.gradients(&mut hops).unwrap();
            for _ in 0..2 {
                hstep.step(&mut hops, &y, 1e-3).unwrap();
            }
            let hweights = hstep.state_dict(&mut hops).unwrap();
            // The largest difference relative to each tensor's scale (NaN sticks).
            let worst = |a: &marlin::model::StateDict, b: &marlin::model::StateDict| {
                let mut w = 0f32;
                for (k, h) in &b.tensors {
                    let scale = common::max_abs(&h.data).max(1e-2);
                    let d = common::max_abs_diff(&a.tensors[k].data, &h.data).diff / scale;
                    w = if d.is_nan() || w.is_nan() {
                        f32::NAN
                    } else {
                        w.max(d)
                    };
                }
                w
            };
            let mut failures = Vec::new();
            for p in [Precision::F32, Precision::Tf32] {
                let tol = if p == Precision::F32 { 1e-4 } else { 1e-2 };
                let mut ops = CudaTrainOps::new(0, p).unwrap_or_else(|e| panic!("{p}: {e}"));
                // Recomputing the LayerNorm and GELU outputs, as a run on the ops does.
                let acts = Activations::of(&ops);
                let step = FinetuneStep::new_in(&cfg, &sd, b, kind, acts).unwrap();
                step.load(&mut ops).unwrap();
                step.upload_clips(&mut ops, &clip).unwrap();
                let logits = step.forward(&mut ops).unwrap();
                let dlog = common::max_abs_diff(&logits, &hlogits).diff;
                step.backward(&mut ops, &dl).unwrap();
                let dg = worst(&step.gradients(&mut ops).unwrap(), &hgrads);
                // The same two updates from the start (a fresh step: Adam's state at zero).
                let mut step = FinetuneStep::new_in(&cfg, &sd, b, kind, acts).unwrap();
                step.load(&mut ops).unwrap();
                step.upload_clips(&mut ops, &clip).unwrap();
                for _ in 0..2 {
                    step.step(&mut ops, &y, 1e-3).unwrap();
                }
                let dw = worst(&step.state_dict(&mut ops).unwrap(), &hweights);
                println!("parity finetune_engine_logits_{p} {dlog:.3e}");
                println!("parity finetune_engine_grads_{p} {dg:.3e}");
                println!("parity finetune_engine_weights_{p} {dw:.3e}");
                if !(dlog <= tol && dg <= tol && dw <= tol) {
                    failures.push(format!("{p}: logits {dlog}, gradients {dg}, weights {dw}"));
                }
            }
            assert!(failures.is_empty(), "{failures:#?}");
        }

        /// One bf16 pretraining run on `ops`: the generator's gradients of the first update,
        /// then (from the same weights) one whole step's losses and weights.
        fn pretrain_bf16<O: marlin::engine::train::TrainOps>(
            ops: &mut O,
            batch: (&[f32], &marlin::model::MaskIndices),
            model: (&marlin::MarlinConfig, &marlin::model::StateDict, StepShape),
            lr: f64,
        ) -> (
            marlin::model::StateDict,
            marlin::train::StepLosses,
            marlin::model::StateDict,
        )
        where
            O::Error: std::fmt::Debug,
        {
            use marlin::engine::train::{Activations, DType};
            let (clip, idx) = batch;
            let (cfg, sd, shape) = model;
            // As the ops' runs keep them (the CUDA ops recompute, the host twin keeps).
            let acts = Activations {
                dtype: DType::Bf16,
                recompute: ops.recompute_activations(),
            };
            let step = PretrainStep::new_in(cfg, sd, shape, ADV, acts).unwrap();
            step.load(ops).unwrap();
            step.upload_batch(ops, clip, idx).unwrap();
            step.generator_gradients(ops).unwrap();
            let g = step.gradients(ops).unwrap();
            let mut step = PretrainStep::new_in(cfg, sd, shape, ADV, acts).unwrap();
            step.load(ops).unwrap();
            step.upload_batch(ops, clip, idx).unwrap();
            let l = step.step(ops, lr).unwrap();
            (g, l, step.state_dict(ops).unwrap())
        }

        /// One bf16 fine-tuning run on `ops`: logits and gradients of the first batch, then
        /// (from the same weights) the weights after two Adam updates.
        fn finetune_bf16<O: marlin::engine::train::TrainOps>(
            ops: &mut O,
            clip: &[f32],
            y: &[f32],
            (cfg, sd, b): (&marlin::MarlinConfig, &marlin::model::StateDict, usize),
        ) -> (Vec<f32>, marlin::model::StateDict, marlin::model::StateDict)
        where
            O::Error: std::fmt::Debug,
        {
            use marlin::engine::finetune::{FinetuneStep, HeadLoss};
            use marlin::engine::train::{Activations, DType};
            let kind = HeadLoss::BinaryCrossEntropy;
            let acts = Activations {
                dtype: DType::Bf16,
                recompute: ops.recompute_activations(),
            };
            let step = FinetuneStep::new_in(cfg, sd, b, kind, acts).unwrap();
            step.load(ops).unwrap();
            step.upload_clips(ops, clip).unwrap();
            let logits = step.forward(ops).unwrap();
            let (_, dl) = kind.loss_and_grad(&logits, y, step.classes);
            step.backward(ops, &dl).unwrap();
            let g = step.gradients(ops).unwrap();
            let mut step = FinetuneStep::new_in(cfg, sd, b, kind, acts).unwrap();
            step.load(ops).unwrap();
            step.upload_clips(ops, clip).unwrap();
            for _ in 0..2 {
                step.step(ops, y, 1e-3).unwrap();
            }
            (logits, g, step.state_dict(ops).unwrap())
        }

        /// The bf16 steps on CUDA (bf16 tapes and products, f32 sums; attention on cuDNN's
        /// fused SDPA forward and backward, and on train.cu's CUDA-core kernels) against their
        /// host twins, which round where the GPU rounds (the CPU suite checks the twins against
        /// the f32 steps): pretraining losses within 1% of the twin's and of the peer's fp32
        /// step, all generator gradients within 3% (L2) of the twin's, the weights after one
        /// step within 2·lr; fine-tuning's logits (2%), gradients (3%) and weights (1%, L2).
        #[test]
        fn the_bf16_steps_follow_their_host_twins() {
            use crate::finetune_engine::{classifier, targets};
            use marlin::engine::finetune::HeadLoss;
            use marlin::engine::host_train::HostTrainOps;
            use marlin::engine::train::DType;
            let _one = lock();
            let mut failures = Vec::new();
            let lr = 1.5e-4;
            let (model, clip, idx) = tiny_a_batch_on::<CpuAutodiff>(&Default::default());
            let clip = to_f32_vec(clip);
            let (cfg, sd, b) = (model.config.clone(), model.to_state_dict(), idx.batch);
            let shape = StepShape {
                batch: b,
                visible: idx.visible.len() / b,
                masked: idx.masked.len() / b,
            };
            let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
            let mut hops = HostTrainOps::default().with_activations(DType::Bf16);
            let pre = (&cfg, &sd, shape);
            let (gh, lh, wh) = pretrain_bf16(&mut hops, (&clip, &idx), pre, lr);
            let (fmodel, fclip, fcfg) = classifier();
            let fb = fclip.dims()[0];
            let fclip = to_f32_vec(fclip);
            let fsd = fmodel.to_state_dict("start");
            let y = targets(HeadLoss::BinaryCrossEntropy, fb);
            let fine = (&fcfg, &fsd, fb);
            let (flh, fgh, fwh) = finetune_bf16(&mut hops, &fclip, &y, fine);
            for path in ["cudnn", "cuda_cores"] {
                let ops =
                    CudaTrainOps::new(0, Precision::Bf16).unwrap_or_else(|e| panic!("bf16: {e}"));
                let mut ops = match path {
                    "cudnn" => ops,
                    _ => ops.without_cudnn(),
                };
                let (gg, lg, wg) = pretrain_bf16(&mut ops, (&clip, &idx), pre, lr);
                let (flg, fgg, fwg) = finetune_bf16(&mut ops, &fclip, &y, fine);
                for note in marlin::engine::train::TrainOps::notes(&ops) {
                    println!("note bf16 {path}: {note}");
                }
                let dg = common::rel_l2(&gg, &gh);
                let mut worst_loss = 0f64;
                for (name, ours, twin) in [
                    ("d_loss", lg.d_loss, lh.d_loss),
                    ("rec", lg.rec, lh.rec),
                    ("g_loss", lg.g_loss, lh.g_loss),
                ] {
                    let d = (ours - twin).abs() / twin.abs().max(1e-3);
                    eprintln!("bf16 {path} {name}: GPU {ours:.6}, host twin {twin:.6}");
                    worst_loss = if d.is_nan() {
                        f64::NAN
                    } else {
                        worst_loss.max(d)
                    };
                }
                for (name, ours, peer) in loss_pairs(&lg, &want) {
                    let d = (ours - peer).abs() / peer.abs().max(1e-3);
                    eprintln!("bf16 {path} {name}: GPU {ours:.6}, PyTorch fp32 {peer:.6}");
                    worst_loss = if d.is_nan() {
                        f64::NAN
                    } else {
                        worst_loss.max(d)
                    };
                }
                let fold = |m: f32, d: f32| {
                    if d.is_nan() || m.is_nan() {
                        f32::NAN
                    } else {
                        m.max(d)
                    }
                };
                let dw = weight_diffs(&wg, &want)
                    .iter()
                    .map(|(_, d)| *d)
                    .fold(0f32, fold);
                let dwh = wh
                    .tensors
                    .iter()
                    .map(|(k, t)| common::max_abs_diff(&wg.tensors[k].data, &t.data).diff)
                    .fold(0f32, fold);
                println!("parity train_engine_grads_bf16_{path} {dg:.3e}");
                println!("parity train_engine_step_loss_bf16_{path} {worst_loss:.3e}");
                println!("parity train_engine_step_weights_bf16_{path} {dw:.3e}");
                let two_lr = 2.0 * lr as f32 + 1e-6;
                if !(dg <= 3e-2 && worst_loss <= 1e-2 && dw <= two_lr && dwh <= two_lr) {
                    failures.push(format!(
                        "bf16 {path} pretraining: gradients {dg} (L2, vs the twin), losses \
                         {worst_loss} (relative), weights {dw} from the peer's, {dwh} from the \
                         twin's"
                    ));
                }
                let dlog = common::max_abs_diff(&flg, &flh).diff / common::max_abs(&flh).max(1e-2);
                let (dg, dw) = (common::rel_l2(&fgg, &fgh), common::rel_l2(&fwg, &fwh));
                println!("parity finetune_engine_logits_bf16_{path} {dlog:.3e}");
                println!("parity finetune_engine_grads_bf16_{path} {dg:.3e}");
                println!("parity finetune_engine_weights_bf16_{path} {dw:.3e}");
                if !(dlog <= 2e-2 && dg <= 3e-2 && dw <= 1e-2) {
                    failures.push(format!(
                        "bf16 {path} fine-tuning: logits {dlog}, gradients {dg}, weights {dw}"
                    ));
                }
            }
            assert!(failures.is_empty(), "{failures:#?}");
        }
    }
}

#[cfg(feature = "vulkan")]
mod vulkan {
    gpu_suite!(
        marlin::backend::Vulkan,
        DeviceSpec::Vulkan(0),
        marlin::backend::wgpu::device(marlin::backend::wgpu::Api::Vulkan, 0)
            .unwrap_or_else(|e| panic!("{e}")),
        "vulkan"
    );
}
