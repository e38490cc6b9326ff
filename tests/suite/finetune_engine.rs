//! Fine-tuning on the training engine (`engine::finetune`, the schedule the CUDA ops run) on
//! its host twin: the logits, the head's loss, every gradient and two Adam updates equal burn's
//! autodiff fine-tuning step (the path `marlin finetune --step burn` takes, `probe::train`) on
//! the same clips, for both of the head's losses.

use crate::pretrain_step::tiny_a_batch_on;
use crate::train_engine::assert_gradients;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::Tensor;
use marlin::backend::CpuAutodiff;
use marlin::engine::finetune::{FinetuneStep, HeadLoss};
use marlin::engine::host_train::HostTrainOps;
use marlin::engine::train::{Activations, DType, TrainEngineError};
use marlin::model::load::to_f32_vec;
use marlin::model::weights::HostTensor;
use marlin::model::StateDict;
use marlin::probe::classifier::Classifier;
use marlin::probe::metrics::TaskKind;

type B = CpuAutodiff;
const K: usize = 3;

/// The tiny_a encoder under a fresh 3-logit head, and its fixture clips.
pub(crate) fn classifier() -> (Classifier<B>, Tensor<B, 5>, marlin::MarlinConfig) {
    let dev = Default::default();
    let (model, clip, _) = tiny_a_batch_on::<B>(&dev);
    let cfg = model.config.clone();
    let d = cfg.encoder.embed_dim;
    (
        Classifier::new(Some(model.encoder), d, K, 7, &dev),
        clip,
        cfg,
    )
}

/// The targets of the test batch: class indices for cross-entropy, 0/1 per logit otherwise.
pub(crate) fn targets(kind: HeadLoss, batch: usize) -> Vec<f32> {
    match kind {
        HeadLoss::CrossEntropy => (0..batch).map(|i| ((i * 2 + 1) % K) as f32).collect(),
        HeadLoss::BinaryCrossEntropy => (0..batch * K)
            .map(|i| ((i * 5) % 3 == 0) as u8 as f32)
            .collect(),
    }
}

/// The head's loss in burn: the one `probe::train` trains with.
fn burn_loss(logits: Tensor<B, 2>, y: &[f32], kind: HeadLoss) -> Tensor<B, 1> {
    let task = match kind {
        HeadLoss::CrossEntropy => TaskKind::Multiclass,
        HeadLoss::BinaryCrossEntropy => TaskKind::Multilabel,
    };
    marlin::probe::train::loss(logits, y, task)
}

/// burn's gradients of `loss` for every parameter, read back as the change an SGD step with
/// lr 1 makes, in the checkpoint's names.
fn burn_gradients(model: &Classifier<B>, loss: Tensor<B, 1>) -> StateDict {
    let before = model.to_state_dict("burn");
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut sgd = SgdConfig::new().init::<B, Classifier<B>>();
    let after = sgd.step(1.0, model.clone(), grads).to_state_dict("burn");
    let mut out = StateDict::new("burn");
    for (k, b) in &before.tensors {
        let a = &after.tensors[k];
        let g = b.data.iter().zip(&a.data).map(|(b, a)| b - a).collect();
        out.tensors
            .insert(k.clone(), HostTensor::new(b.shape.clone(), g));
    }
    out
}

fn engine(
    cfg: &marlin::MarlinConfig,
    model: &Classifier<B>,
    clip: &[f32],
    batch: usize,
    kind: HeadLoss,
) -> (FinetuneStep, HostTrainOps) {
    let step = FinetuneStep::new(cfg, &model.to_state_dict("start"), batch, kind).unwrap();
    let mut ops = HostTrainOps::default();
    step.load(&mut ops).unwrap();
    step.upload_clips(&mut ops, clip).unwrap();
    (step, ops)
}

#[test]
fn engine_finetune_gradients_equal_burns_autodiff() {
    let (model, clip_t, cfg) = classifier();
    let clip = to_f32_vec(clip_t.clone());
    let batch = clip_t.dims()[0];
    for kind in [HeadLoss::BinaryCrossEntropy, HeadLoss::CrossEntropy] {
        let y = targets(kind, batch);
        let (step, mut ops) = engine(&cfg, &model, &clip, batch, kind);
        let logits = step.forward(&mut ops).unwrap();
        let burn_logits = model.forward_clips(clip_t.clone());
        let d = crate::common::max_abs_diff(&logits, &to_f32_vec(burn_logits.clone()));
        eprintln!("{kind:?}: logits {d}");
        assert!(d.diff <= 1e-5, "{kind:?} logits: {d}");
        let (loss, dlogits) = kind.loss_and_grad(&logits, &y, K);
        let bl = burn_loss(burn_logits, &y, kind);
        let want = to_f32_vec(bl.clone())[0] as f64;
        eprintln!("{kind:?}: loss engine {loss:.7}, burn {want:.7}");
        assert!(
            (loss - want).abs() <= 1e-5,
            "{kind:?} loss {loss} vs {want}"
        );
        step.backward(&mut ops, &dlogits).unwrap();
        let ours = step.gradients(&mut ops).unwrap();
        let burn = burn_gradients(&model, bl);
        let reference = burn
            .tensors
            .iter()
            .filter(|(k, _)| !k.contains("pos_embedding"))
            .map(|(k, g)| (k.as_str(), g));
        let n = assert_gradients(&format!("{kind:?}"), &ours, reference);
        // The tubelet embedding 2, 2 blocks x 13 (q and v biases), the norm 2, the head 2.
        assert_eq!(n, 2 + 2 * 13 + 2 + 2, "{kind:?}: compared {n} gradients");
    }
}

#[test]
fn engine_finetune_steps_equal_burns_adam() {
    let (model, clip_t, cfg) = classifier();
    let clip = to_f32_vec(clip_t.clone());
    let batch = clip_t.dims()[0];
    let kind = HeadLoss::BinaryCrossEntropy;
    let y = targets(kind, batch);
    let lr = 1e-3;
    let (mut step, mut ops) = engine(&cfg, &model, &clip, batch, kind);
    let mut optim = AdamConfig::new()
        .with_beta_1(0.5)
        .with_beta_2(0.9)
        .with_epsilon(1e-8)
        .init::<B, Classifier<B>>();
    let start = model.to_state_dict("start");
    let mut m = model;
    for i in 1..=2 {
        let ours = step.step(&mut ops, &y, lr).unwrap().expect("a finite loss");
        let l = burn_loss(m.forward_clips(clip_t.clone()), &y, kind);
        let want = to_f32_vec(l.clone())[0] as f64;
        assert!(
            (ours - want).abs() <= 1e-5,
            "step {i}: loss {ours} vs {want}"
        );
        let grads = GradientsParams::from_grads(l.backward(), &m);
        m = optim.step(lr, m, grads);
        let a = step.state_dict(&mut ops).unwrap();
        let b = m.valid().to_state_dict("burn");
        let mut worst = 0f32;
        for (k, t) in &b.tensors {
            let d = crate::common::max_abs_diff(&a.tensors[k].data, &t.data).diff;
            // Adam's first updates are about lr·g/(|g| + eps): where a gradient is within
            // float error of eps (1e-8) the two sides move apart by a share of lr (1e-3);
            // seen 9.4e-6.
            assert!(d <= 1e-4, "step {i}: {k} differs by {d}");
            worst = worst.max(d);
        }
        eprintln!(
            "after {i} Adam updates: {} tensors, max abs diff {worst:.2e}",
            b.tensors.len()
        );
    }
    // The updates moved every weight of the head (Adam: about lr per update).
    let now = step.state_dict(&mut ops).unwrap();
    let moved = crate::common::max_abs_diff(
        &now.tensors["fc.weight"].data,
        &start.tensors["fc.weight"].data,
    );
    assert!(moved.diff >= lr as f32, "{moved}");
    // The weights are a classifier checkpoint again.
    let sd = step.state_dict(&mut ops).unwrap();
    let back =
        Classifier::<marlin::backend::Cpu>::from_state_dict(&sd, Some(&cfg), &Default::default());
    assert!(back.is_ok(), "{:?}", back.err());
}

#[test]
fn engine_finetune_refuses_layer_scale_and_other_batch_sizes() {
    let (model, clip_t, mut cfg) = classifier();
    let batch = clip_t.dims()[0];
    let sd = model.to_state_dict("start");
    let (step, mut ops) = engine(
        &cfg,
        &model,
        &to_f32_vec(clip_t),
        batch,
        HeadLoss::CrossEntropy,
    );
    let e = step.upload_clips(&mut ops, &[0.0; 7]).unwrap_err();
    assert!(
        matches!(e, TrainEngineError::BatchSize { want, .. } if want == batch),
        "{e}"
    );
    cfg.init_values = 0.1;
    let e = FinetuneStep::new(&cfg, &sd, batch, HeadLoss::CrossEntropy).unwrap_err();
    assert!(e.to_string().contains("layer scale"), "{e}");
}

/// The fine-tuning step writes every value it reads: on NaN-filled fresh buffers two steps
/// give exactly what they give on zeroed ones.
#[test]
fn the_finetuning_step_reads_nothing_it_did_not_write() {
    for dtype in [DType::F32, DType::Bf16] {
        let kept = finetuning_reads_nothing_it_did_not_write(Activations::from(dtype));
        // Recomputing the LayerNorm and GELU outputs (the CUDA ops' way): the same step.
        let again = finetuning_reads_nothing_it_did_not_write(Activations {
            dtype,
            recompute: true,
        });
        assert_eq!(kept.0, again.0, "{dtype:?}: losses");
        for (a, b) in [(&kept.1, &again.1), (&kept.2, &again.2)] {
            for (k, t) in &a.tensors {
                assert_eq!(t.data, b.tensors[k].data, "{dtype:?} recomputing: {k}");
            }
        }
    }
}

/// Two steps on zeroed and on NaN-filled fresh buffers, which must agree: their losses, last
/// gradients and weights.
fn finetuning_reads_nothing_it_did_not_write(act: Activations) -> (Vec<f64>, StateDict, StateDict) {
    let (model, clip_t, cfg) = classifier();
    let batch = clip_t.dims()[0];
    let clip = to_f32_vec(clip_t);
    let kind = HeadLoss::CrossEntropy;
    let y = targets(kind, batch);
    let sd = model.to_state_dict("start");
    let run = |ops: HostTrainOps| {
        let mut ops = ops.with_activations(act.dtype).recomputing(act.recompute);
        let mut step = FinetuneStep::new_in(&cfg, &sd, batch, kind, act).unwrap();
        step.load(&mut ops).unwrap();
        step.upload_clips(&mut ops, &clip).unwrap();
        let losses: Vec<f64> = (0..2)
            .map(|_| {
                step.step(&mut ops, &y, 1e-3)
                    .unwrap()
                    .expect("a finite loss")
            })
            .collect();
        (
            losses,
            step.gradients(&mut ops).unwrap(),
            step.state_dict(&mut ops).unwrap(),
        )
    };
    let (l0, g0, w0) = run(HostTrainOps::default());
    let (l1, g1, w1) = run(HostTrainOps::poisoned());
    assert_eq!(l0, l1, "{act:?}: losses on zeroed vs NaN-filled buffers");
    for (a, b) in [(&g0, &g1), (&w0, &w1)] {
        assert_eq!(a.tensors.len(), b.tensors.len());
        for (k, t) in &a.tensors {
            assert_eq!(t.data, b.tensors[k].data, "{act:?}: {k}");
        }
    }
    (l0, g0, w0)
}

/// The bf16 fine-tuning step (the encoder blocks on bf16 operands, f32 sums and master
/// weights) follows the f32 step on the host twin: the loss within 1%, all gradients within 3%
/// (L2) yet not equal, and after two Adam updates the weights within 4·lr of the f32 run's.
#[test]
fn the_bf16_finetuning_step_follows_the_f32_step() {
    let (model, clip_t, cfg) = classifier();
    let batch = clip_t.dims()[0];
    let clip = to_f32_vec(clip_t);
    let kind = HeadLoss::BinaryCrossEntropy;
    let y = targets(kind, batch);
    let sd = model.to_state_dict("start");
    let lr = 1e-3;
    let run = |act: DType| {
        let mut ops = HostTrainOps::default().with_activations(act);
        let mut step = FinetuneStep::new_in(&cfg, &sd, batch, kind, act).unwrap();
        step.load(&mut ops).unwrap();
        step.upload_clips(&mut ops, &clip).unwrap();
        let loss = step.step(&mut ops, &y, lr).unwrap().expect("a finite loss");
        let g = step.gradients(&mut ops).unwrap();
        step.step(&mut ops, &y, lr).unwrap().expect("a finite loss");
        (loss, g, step.state_dict(&mut ops).unwrap())
    };
    let (l32, g32, w32) = run(DType::F32);
    let (l16, g16, w16) = run(DType::Bf16);
    eprintln!("loss: bf16 {l16:.6}, f32 {l32:.6}");
    assert!((l16 - l32).abs() <= 1e-2 * l32.abs(), "{l16} vs {l32}");
    let rel = crate::common::rel_l2(&g16, &g32);
    eprintln!("bf16 gradients: relative L2 error {rel:.2e}");
    assert!(rel <= 3e-2 && rel > 0.0, "relative L2 error {rel}");
    for (k, w) in &w32.tensors {
        let d = crate::common::max_abs_diff(&w16.tensors[k].data, &w.data).diff;
        assert!(d <= 4.0 * lr as f32 + 1e-6, "{k}: weights differ by {d}");
    }
}

/// The fine-tuning backward hands each layer's gradients on once final, as the pretraining
/// step's (see `train_engine::the_backward_hands_on_each_layer_once_final`), and a step that
/// hands them on is the plain step.
#[test]
fn the_finetuning_backward_hands_on_each_layer_once_final() {
    let (model, clip_t, cfg) = classifier();
    let clip = to_f32_vec(clip_t.clone());
    let batch = clip_t.dims()[0];
    let kind = HeadLoss::CrossEntropy;
    let y = targets(kind, batch);
    let (mut plain, mut plain_ops) = engine(&cfg, &model, &clip, batch, kind);
    let want = plain.step(&mut plain_ops, &y, 1e-3).unwrap();
    let want_w = plain.state_dict(&mut plain_ops).unwrap();
    let (mut step, mut ops) = engine(&cfg, &model, &clip, batch, kind);
    let mut check = crate::train_engine::PieceCheck::new(0);
    let got = step.step_with(&mut ops, &y, 1e-3, &mut check).unwrap();
    assert_eq!(check.updates.len(), 1);
    let pieces = check.updates[0].len();
    assert!(pieces > cfg.encoder.depth + 2, "{pieces} pieces");
    assert_eq!(got, want);
    let w = step.state_dict(&mut ops).unwrap();
    for (k, t) in &want_w.tensors {
        assert_eq!(t.data, w.tensors[k].data, "{k}");
    }
}
