//! The CUDA backend against marlin-pytorch's fixtures and the CPU backend, in every
//! precision (built with `--features cuda`; run on a machine with an NVIDIA GPU by
//! `bench/gpu.sh`: `suite gpu:: --test-threads 1`). The precision is a per-process setting:
//! each test walks the precisions in turn, so the module runs on one test thread.
//!
//! Tolerances (max abs diff of features, whose entries are of order 1):
//! - fp32: 1e-4 against the peer's fp32 (as on the CPU), 1e-4 against the CPU backend.
//! - tf32: 2e-2 against fp32, cosine >= 0.9999 (TF32 keeps 10 of f32's 23 mantissa bits).
//! - bf16: as the CPU's bf16 test: at most twice the peer's own bf16-autocast distance from
//!   its fp32 plus 1e-2, cosine >= 0.9999.

use crate::common;
use crate::model_parity::{
    cosine, fixture, io, load_on, mask_indices, max_abs_diff, tensor, vitb2, vitb2_on, CASES, TOL,
};
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use marlin::backend::{Cpu, Gpu};
use marlin::kernels::{set_gpu_precision, Precision};
use marlin::model::weights::read_safetensors_file;
use marlin::model::Part;

const PRECISIONS: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];
const TF32_TOL: f32 = 2e-2;

fn dev() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(0)
}

fn host<const D: usize>(t: Tensor<Gpu, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

/// The tiny fixtures (four configs, keep_seq and pooled, the reconstruction) and the released
/// width (768 wide, 1568 tokens, 2 blocks) on CUDA against the peer and the CPU backend.
#[test]
fn features_match_the_peer_and_the_cpu_in_every_precision() {
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
    for p in PRECISIONS {
        set_gpu_precision(p);
        let tol = match p {
            Precision::F32 => TOL,
            Precision::Tf32 => TF32_TOL,
            Precision::Bf16 => 2.0 * peer_bf16_gap + 1e-2,
        };
        for case in CASES {
            let io = io(case);
            let model = load_on::<Gpu>(case, &format!("{case}.full.pt"), &[Part::Decoder], &dev());
            let clip: Tensor<Gpu, 5> = tensor(&io["clip"], &dev());
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
            eprintln!("cuda {p} {case}: keep_seq {d_seq:.2e} pooled {d_pool:.2e} reconstruction {d_fwd:.2e}");
            if d_seq.max(d_pool).max(d_fwd) > tol {
                failures.push(format!("{p} {case}: {d_seq} {d_pool} {d_fwd} > {tol}"));
            }
        }
        let (model, clip) = vitb2_on::<Gpu>(&cfg, &dev());
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
            "cuda {p} ViT-B width: pooled {d_pool:.2e} keep_seq {d_seq:.2e} vs the peer's fp32, \
             {d_cpu:.2e} vs the CPU backend, cosine {cos:.6} (the peer's bf16 autocast: \
             {peer_bf16_gap:.2e}, cosine {:.6})",
            cosine(&peer_bf16["features"].data, fp32)
        );
        let cpu_tol = if p == Precision::F32 { TOL } else { tol };
        if d_pool.max(d_seq) > tol || d_cpu > cpu_tol || (p != Precision::F32 && cos < 0.9999) {
            failures.push(format!(
                "{p} ViT-B width: {d_pool} {d_seq} {d_cpu} cos {cos}"
            ));
        }
    }
    set_gpu_precision(Precision::default_for(true));
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One pretraining step (critic, then generator) of tiny_a on CUDA's autodiff against the
/// peer's step (tests/fixtures/train/step.safetensors): losses and updated weights within
/// 1e-4 in fp32; in TF32 and bf16 the losses within 2e-2 (relative) and the weights within
/// 1e-3 (one AdamW step moves a weight by about lr = 1.5e-4, so this pins little more than
/// that the step ran: the numbers are printed for the record).
#[test]
fn a_pretraining_step_matches_the_peer_in_every_precision() {
    let want = read_safetensors_file(&crate::pretrain_step::fx("train/step.safetensors")).unwrap();
    let mut failures = Vec::new();
    for p in PRECISIONS {
        set_gpu_precision(p);
        let (model, clip, idx) = crate::pretrain_step::tiny_a_batch_on::<Autodiff<Gpu>>(&dev());
        let (t, got) = crate::pretrain_step::fixture_step(model, clip, &idx);
        let mut worst_loss = 0f64;
        for (_, ours, peer) in crate::pretrain_step::loss_pairs(&got, &want) {
            let d = (ours - peer).abs();
            worst_loss = worst_loss.max(if p == Precision::F32 {
                d
            } else {
                d / peer.abs().max(1e-3)
            });
        }
        let diffs = crate::pretrain_step::weight_diffs(&t.model().to_state_dict(), &want);
        let wmax = diffs.iter().fold(0f32, |m, (_, d)| m.max(*d));
        let n = diffs.len();
        eprintln!("cuda {p} step: losses {worst_loss:.2e}, {n} updated tensors {wmax:.2e}");
        let (lt, wt) = if p == Precision::F32 {
            (1e-4, 1e-4)
        } else {
            (2e-2, 1e-3)
        };
        if worst_loss > lt || wmax > wt || n < 40 {
            failures.push(format!("{p}: losses {worst_loss}, weights {wmax} ({n})"));
        }
    }
    set_gpu_precision(Precision::default_for(true));
    assert!(failures.is_empty(), "{failures:#?}");
}
