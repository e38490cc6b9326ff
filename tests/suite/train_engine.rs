//! The training engine's pretraining step (`engine::train`, the schedule the CUDA step runs)
//! on its host twin: one step equals the peer's step (tools/make_train_fixtures.py), the
//! reconstruction gradients equal the peer's tensor by tensor, and the adversarial step's
//! gradients (critic and generator) equal burn's autodiff on the same batch.

use crate::common;
use crate::pretrain_step::{fx, loss_pairs, tiny_a_batch_on, weight_diffs};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use marlin::backend::CpuAutodiff;
use marlin::engine::host_train::HostTrainOps;
use marlin::engine::train::{
    host_step, Activations, DType, GradSync, PretrainStep, StepShape, TrainEngineError, TrainOps, T,
};
use marlin::model::load::to_f32_vec;
use marlin::model::weights::read_safetensors_file;
use marlin::model::MaskIndices;
use marlin::model::StateDict;
use marlin::train::LossConfig;
use marlin::{Marlin, MarlinConfig};
use std::convert::Infallible;

/// The released configs' losses (critic on, adv_weight 0.01, no penalty), as the step fixture.
pub(crate) const ADV: LossConfig = LossConfig {
    adv_loss: true,
    adv_weight: 0.01,
    gp_weight: 0.0,
    d_steps: 1,
    g_steps: 1,
};

fn shape(idx: &MaskIndices) -> StepShape {
    StepShape {
        batch: idx.batch,
        visible: idx.visible.len() / idx.batch,
        masked: idx.masked.len() / idx.batch,
    }
}

/// The tiny_a model's weights, its batch as host values, its config and mask.
fn tiny_a() -> (
    Marlin<CpuAutodiff>,
    burn::tensor::Tensor<CpuAutodiff, 5>,
    Vec<f32>,
    MaskIndices,
) {
    let (model, clip, idx) = tiny_a_batch_on::<CpuAutodiff>(&Default::default());
    let values = to_f32_vec(clip.clone());
    (model, clip, values, idx)
}

fn engine(
    model: &Marlin<CpuAutodiff>,
    clip: &[f32],
    idx: &MaskIndices,
    losses: LossConfig,
) -> (PretrainStep, marlin::engine::host_train::HostTrainOps) {
    let cfg: &MarlinConfig = &model.config;
    let (step, mut ops) = host_step(cfg, &model.to_state_dict(), shape(idx), losses).unwrap();
    step.upload_batch(&mut ops, clip, idx).unwrap();
    (step, ops)
}

#[test]
fn one_engine_step_equals_pytorchs_step() {
    let (model, _, clip, idx) = tiny_a();
    let (mut step, mut ops) = engine(&model, &clip, &idx, ADV);
    let got = step.step(&mut ops, 1.5e-4).unwrap();
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    for (name, ours, peer) in loss_pairs(&got, &want) {
        eprintln!("{name}: engine {ours:.6}, PyTorch {peer:.6}");
        assert!((ours - peer).abs() <= 1e-4, "{name}: {ours} vs {peer}");
    }
    let sd = step.state_dict(&mut ops).unwrap();
    let diffs = weight_diffs(&sd, &want);
    let worst = diffs.iter().map(|(_, d)| *d).collect::<Vec<f32>>();
    for (key, d) in &diffs {
        assert!(*d <= 1e-4, "{key}: updated weights differ by {d}");
    }
    eprintln!(
        "{} parameters after the engine's step: max abs diff {:.2e}",
        diffs.len(),
        common::max_abs(&worst)
    );
    assert!(diffs.len() > 40, "compared {} tensors", diffs.len());
}

/// The reconstruction loss's gradients (no critic) against the peer's, tensor by tensor: within
/// 1e-4 of the larger of the tensor's max |grad| and 1e-2.
#[test]
fn engine_reconstruction_gradients_equal_pytorchs() {
    let (model, _, clip, idx) = tiny_a();
    let rec_only = LossConfig {
        adv_loss: false,
        ..ADV
    };
    let (step, mut ops) = engine(&model, &clip, &idx, rec_only);
    step.generator_gradients(&mut ops).unwrap();
    let grads = step.gradients(&mut ops).unwrap();
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    let peer = want
        .iter()
        .filter_map(|(k, g)| Some((k.strip_prefix("grad.")?, g)));
    let n = assert_gradients("PyTorch", &grads, peer);
    assert!(n > 40, "compared {n} gradients");
}

/// Each reference gradient against ours: within 1e-4 of the larger of its max |grad| and 1e-2
/// (NaN fails). Returns how many it compared.
pub(crate) fn assert_gradients<'a>(
    what: &str,
    ours: &marlin::model::StateDict,
    reference: impl Iterator<Item = (&'a str, &'a marlin::model::weights::HostTensor)>,
) -> usize {
    let mut n = 0;
    for (key, g) in reference {
        let o = ours
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{what}: no gradient for {key}"));
        let scale = common::max_abs(&g.data);
        let d = common::max_abs_diff(&o.data, &g.data);
        eprintln!(
            "{what} {key}: max |grad| {scale:.3e}, max abs diff {:.2e}",
            d.diff
        );
        assert!(
            d.diff <= 1e-4 * scale.max(1e-2),
            "{what} {key}: {d} (max |grad| {scale})"
        );
        n += 1;
    }
    n
}

/// burn's gradients of `loss` for every parameter of `model`, read back as the change an SGD
/// step with lr 1 makes, in the peer's names.
fn burn_gradients<B: AutodiffBackend>(
    model: Marlin<B>,
    loss: burn::tensor::Tensor<B, 1>,
) -> marlin::model::StateDict {
    let before = model.to_state_dict();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut sgd = SgdConfig::new().init::<B, Marlin<B>>();
    let after = sgd.step(1.0, model, grads).to_state_dict();
    let mut out = marlin::model::StateDict::new("burn");
    for (k, b) in &before.tensors {
        let a = &after.tensors[k];
        let g = b.data.iter().zip(&a.data).map(|(b, a)| b - a).collect();
        out.tensors.insert(
            k.clone(),
            marlin::model::weights::HostTensor::new(b.shape.clone(), g),
        );
    }
    out
}

/// [`assert_gradients`] against burn's gradients of the parameters under `prefix` (the
/// positional tables are constants).
fn compare(
    what: &str,
    ours: &marlin::model::StateDict,
    burn: &marlin::model::StateDict,
    prefix: &[&str],
) -> usize {
    let reference = burn
        .tensors
        .iter()
        .filter(|(k, _)| prefix.iter().any(|p| k.starts_with(p)) && !k.contains("pos_embedding"));
    assert_gradients(what, ours, reference.map(|(k, g)| (k.as_str(), g)))
}

/// The critic loss's gradients and the generator loss's (MSE + 0.01 × adversarial) equal
/// burn's autodiff of the same losses on the same batch.
#[test]
fn engine_adversarial_gradients_equal_burns_autodiff() {
    let (model, clip_t, clip, idx) = tiny_a();
    let (step, mut ops) = engine(&model, &clip, &idx, ADV);

    // The critic: mean C(pred) - mean C(real), the prediction without gradient.
    step.critic_gradients(&mut ops).unwrap();
    let ours = step.gradients(&mut ops).unwrap();
    let mut m = model.clone();
    let critic = m.discriminator.take().unwrap();
    let real = m.target(clip_t.clone(), &idx);
    let pred = m.forward_indices(clip_t.clone(), &idx).unwrap().detach();
    let d_loss = critic.forward(pred).mean() - critic.forward(real.clone()).mean();
    let mut m = model.clone();
    m.discriminator = Some(critic);
    let burn_d = burn_gradients(m, d_loss);
    let nd = compare("critic", &ours, &burn_d, &["discriminator."]);

    // The generator: MSE + 0.01 · -mean C(pred), through the critic into the decoder.
    step.generator_gradients(&mut ops).unwrap();
    let ours = step.gradients(&mut ops).unwrap();
    let pred = model.forward_indices(clip_t.clone(), &idx).unwrap();
    let diff = pred.clone() - real;
    let critic = model.discriminator.as_ref().unwrap();
    let g_loss = (diff.clone() * diff).mean() - critic.forward(pred).mean().mul_scalar(0.01);
    let burn_g = burn_gradients(model.clone(), g_loss);
    let ng = compare(
        "generator",
        &ours,
        &burn_g,
        &["encoder.", "decoder.", "enc_dec_proj."],
    );
    eprintln!("{nd} critic and {ng} generator gradients equal burn's");
    assert!(
        nd == 4 && ng > 40,
        "compared {nd} critic, {ng} generator tensors"
    );
}

#[test]
fn the_engine_names_what_it_does_not_cover() {
    let (model, _, _, idx) = tiny_a();
    let mut cfg = model.config.clone();
    let sd = model.to_state_dict();
    let gp = LossConfig {
        gp_weight: 10.0,
        ..ADV
    };
    let e = PretrainStep::new(&cfg, &sd, shape(&idx), gp).unwrap_err();
    assert_eq!(
        e,
        TrainEngineError::Unsupported("the gradient penalty (gp_weight > 0)")
    );
    cfg.init_values = 0.1;
    let e = PretrainStep::new(&cfg, &sd, shape(&idx), ADV).unwrap_err();
    assert!(e.to_string().contains("layer scale"), "{e}");
    let mut sd2 = sd.clone();
    sd2.tensors.remove("decoder.mask_token");
    let e = PretrainStep::new(&model.config, &sd2, shape(&idx), ADV).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the training engine needs `decoder.mask_token` in the model's weights"
    );
}

/// The step writes every value it reads: on ops whose fresh buffers hold NaN (as a device's
/// fresh memory holds anything) two steps give exactly the losses, gradients and weights they
/// give on zeroed buffers, in f32 and in bf16.
#[test]
fn the_step_reads_nothing_it_did_not_write() {
    for act in [DType::F32, DType::Bf16] {
        for recompute in [false, true] {
            reads_nothing_it_did_not_write(Activations {
                dtype: act,
                recompute,
            });
        }
    }
}

/// Two steps of the tiny model on `ops` (fresh buffers): (losses, last gradients, weights, the
/// bytes of the buffers (parameters' state, activations)).
type TwoSteps = (Vec<f64>, StateDict, StateDict, (usize, usize));

fn two_steps(acts: Activations, ops: HostTrainOps) -> TwoSteps {
    let (model, _, clip, idx) = tiny_a();
    let sd = model.to_state_dict();
    let mut ops = ops.with_activations(acts.dtype).recomputing(acts.recompute);
    let mut step = PretrainStep::new_in(&model.config, &sd, shape(&idx), ADV, acts).unwrap();
    step.load(&mut ops).unwrap();
    step.upload_batch(&mut ops, &clip, &idx).unwrap();
    let losses: Vec<f64> = (0..2)
        .flat_map(|_| {
            let l = step.step(&mut ops, 1.5e-4).unwrap();
            [l.d_loss, l.rec, l.adv, l.g_loss]
        })
        .collect();
    let g = step.gradients(&mut ops).unwrap();
    let w = step.state_dict(&mut ops).unwrap();
    (losses, g, w, step.buffer_bytes())
}

/// Recomputing the blocks' LayerNorm and GELU outputs in the backward (what the CUDA ops'
/// steps do, for memory) gives the step that keeps them bit for bit, in f32 and in bf16, in
/// fewer bytes of activations.
#[test]
fn recomputing_the_layernorm_and_gelu_outputs_changes_nothing_but_memory() {
    for dtype in [DType::F32, DType::Bf16] {
        let keep = two_steps(Activations::from(dtype), HostTrainOps::default());
        let again = two_steps(
            Activations {
                dtype,
                recompute: true,
            },
            HostTrainOps::default(),
        );
        assert!(
            keep.0.iter().all(|v| v.is_finite()),
            "{dtype:?}: {:?}",
            keep.0
        );
        assert_eq!(keep.0, again.0, "{dtype:?}: losses");
        for (a, b) in [(&keep.1, &again.1), (&keep.2, &again.2)] {
            assert_eq!(a.tensors.len(), b.tensors.len());
            for (k, t) in &a.tensors {
                assert_eq!(t.data, b.tensors[k].data, "{dtype:?}: {k}");
            }
        }
        let ((s0, a0), (s1, a1)) = (keep.3, again.3);
        eprintln!("{dtype:?}: activations {a0} bytes kept, {a1} recomputing");
        assert_eq!(s0, s1, "{dtype:?}: the parameters' state");
        assert!(a1 < a0, "{dtype:?}: {a1} vs {a0} bytes of activations");
    }
}

fn reads_nothing_it_did_not_write(act: Activations) {
    let (l0, g0, w0, _) = two_steps(act, HostTrainOps::default());
    let (l1, g1, w1, _) = two_steps(act, HostTrainOps::poisoned());
    assert!(l0.iter().all(|v| v.is_finite()), "{act:?}: {l0:?}");
    assert_eq!(l0, l1, "{act:?}: losses on zeroed vs NaN-filled buffers");
    for (a, b) in [(&g0, &g1), (&w0, &w1)] {
        assert_eq!(a.tensors.len(), b.tensors.len());
        for (k, t) in &a.tensors {
            assert_eq!(t.data, b.tensors[k].data, "{act:?}: {k}");
        }
    }
}

/// The bf16 step (bf16 activations and product operands, f32 sums, f32 residual stream and
/// master weights) on the host twin: its activations are bf16 values, its losses and gradients
/// follow the f32 step's within bf16's precision (losses 1%; all gradients together 3% in the
/// L2 norm, each within 10% of its tensor's largest value: the first encoder block, last in
/// the backward, collects the most rounding), yet differ from them (the rounding is real), and
/// one AdamW update moves the
/// weights as the f32 step's does (within 2·lr: AdamW's step is about lr wherever a gradient's
/// sign holds).
#[test]
fn the_bf16_step_follows_the_f32_step() {
    let (model, _, clip, idx) = tiny_a();
    let sd = model.to_state_dict();
    let lr = 1.5e-4;
    let run = |act: DType| {
        let mut ops = HostTrainOps::default().with_activations(act);
        let mut step = PretrainStep::new_in(&model.config, &sd, shape(&idx), ADV, act).unwrap();
        assert_eq!(step.activation_dtype(), act);
        step.load(&mut ops).unwrap();
        step.upload_batch(&mut ops, &clip, &idx).unwrap();
        step.generator_gradients(&mut ops).unwrap();
        let grads = step.gradients(&mut ops).unwrap();
        let tape = |name: &str| {
            let buf = step
                .layout
                .floats
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no buffer {name}"));
            assert_eq!(step.layout.dtype(buf), act, "{name}");
            let len = step.layout.floats[buf].1;
            ops.read(marlin::engine::train::T { buf, off: 0, len })
                .unwrap()
        };
        let tapes = ["encoder.0.qkv", "decoder.1.pre", "decoder.0.att"].map(tape);
        let bytes = step.layout.float_bytes();
        let l = step.step(&mut ops, lr).unwrap();
        let w = step.state_dict(&mut ops).unwrap();
        (l, grads, w, tapes, bytes)
    };
    let (l32, g32, w32, _, bytes32) = run(DType::F32);
    let (l16, g16, w16, tapes, bytes16) = run(DType::Bf16);
    for t in &tapes {
        let exact = t.iter().all(|&v| {
            let b = marlin::kernels::bf16::from_bf16(marlin::kernels::bf16::to_bf16(v));
            b == v
        });
        assert!(exact, "a bf16 tape holds values that are not bf16");
        assert!(common::max_abs(t) > 0.0, "an unwritten tape");
    }
    eprintln!("step buffers: f32 {bytes32} bytes, bf16 {bytes16} bytes");
    assert!(bytes16 < bytes32, "bf16 {bytes16} vs f32 {bytes32} bytes");
    for (name, a, b) in [
        ("d_loss", l16.d_loss, l32.d_loss),
        ("rec", l16.rec, l32.rec),
        ("g_loss", l16.g_loss, l32.g_loss),
    ] {
        eprintln!("{name}: bf16 {a:.6}, f32 {b:.6}");
        assert!(
            (a - b).abs() <= 1e-2 * b.abs().max(1e-3),
            "{name}: {a} vs {b}"
        );
    }
    let (mut n, mut moved) = (0, 0f32);
    for (k, g) in &g32.tensors {
        let o = &g16.tensors[k].data;
        let scale = common::max_abs(&g.data);
        let d = common::max_abs_diff(o, &g.data).diff;
        eprintln!("bf16 {k}: max |grad| {scale:.3e}, max abs diff {d:.2e}");
        assert!(d <= 0.1 * scale.max(1e-6), "{k}: {d} of {scale}");
        moved = moved.max(d);
        n += 1;
    }
    let rel = common::rel_l2(&g16, &g32);
    eprintln!("bf16 gradients: relative L2 error {rel:.2e} over {n} tensors");
    assert!(rel <= 3e-2, "bf16 gradients: relative L2 error {rel}");
    assert!(
        n > 40 && moved > 0.0,
        "{n} gradients, largest change {moved}"
    );
    for (k, w) in &w32.tensors {
        let d = common::max_abs_diff(&w16.tensors[k].data, &w.data).diff;
        assert!(
            d <= 2.0 * lr as f32 + 1e-6,
            "{k}: updated weights differ by {d}"
        );
    }
}

/// A [`GradSync`] that checks what the backward hands on: each piece's values when handed on
/// (which must be their final values), the pieces of each update in order from the buffer's
/// end down, together the whole buffer once.
pub(crate) struct PieceCheck {
    pub bucket: usize,
    pending: Vec<(T, Vec<f32>)>,
    /// The pieces of each update so far.
    pub updates: Vec<Vec<T>>,
}

impl PieceCheck {
    pub fn new(bucket: usize) -> Self {
        Self {
            bucket,
            pending: Vec::new(),
            updates: Vec::new(),
        }
    }
}

impl GradSync<HostTrainOps> for PieceCheck {
    fn bucket_len(&self) -> usize {
        self.bucket
    }

    fn ready(&mut self, ops: &mut HostTrainOps, t: T) -> Result<(), Infallible> {
        let v = ops.read(t)?;
        self.pending.push((t, v));
        Ok(())
    }

    fn finish(&mut self, ops: &mut HostTrainOps, all: T, _: &mut [f32]) -> Result<(), Infallible> {
        let pieces = std::mem::take(&mut self.pending);
        let end = all.off + all.len;
        let mut next = end;
        for (t, when_handed_on) in &pieces {
            assert_eq!(t.buf, all.buf, "{t:?} is not in {all:?}");
            assert_eq!(
                t.off + t.len,
                next,
                "{t:?} does not end where the last piece began"
            );
            assert!(t.len > 0, "an empty piece {t:?}");
            if t.off > all.off {
                assert!(
                    t.len >= self.bucket,
                    "{t:?} is under the bucket size {}",
                    self.bucket
                );
            }
            next = t.off;
            let now = ops.read(*t)?;
            assert!(
                now == *when_handed_on,
                "{t:?} changed after it was handed on as final"
            );
        }
        assert_eq!(next, all.off, "the pieces of {all:?} stop at {next}");
        self.updates
            .push(pieces.into_iter().map(|(t, _)| t).collect());
        Ok(())
    }
}

/// The backward hands each layer's gradients on as soon as they are final (what a
/// data-parallel run starts averaging while the backward goes on): every piece keeps its values
/// to the end of the backward, the pieces cover the gradient buffer once, layer by layer
/// without buckets (more pieces than the generator's blocks) and in buckets of at least the
/// bucket size; and a step that hands them on is the plain step.
#[test]
fn the_backward_hands_on_each_layer_once_final() {
    let (model, _, clip, idx) = tiny_a();
    let (mut plain, mut plain_ops) = engine(&model, &clip, &idx, ADV);
    let want = plain.step(&mut plain_ops, 1.5e-4).unwrap();
    let want_w = plain.state_dict(&mut plain_ops).unwrap();
    let blocks = model.config.encoder.depth + model.config.decoder.depth;
    let mut layer_by_layer = 0;
    for bucket in [0, 3000] {
        let (mut step, mut ops) = engine(&model, &clip, &idx, ADV);
        let mut check = PieceCheck::new(bucket);
        let got = step.step_with(&mut ops, 1.5e-4, &mut check).unwrap();
        // The critic's update (one piece), then the generator's.
        assert_eq!(check.updates.len(), 2, "bucket {bucket}");
        assert_eq!(check.updates[0].len(), 1, "bucket {bucket}");
        let gen = &check.updates[1];
        eprintln!(
            "bucket {bucket}: the generator's gradients in {} pieces",
            gen.len()
        );
        match bucket {
            0 => {
                assert!(gen.len() > blocks + 3, "{} pieces", gen.len());
                layer_by_layer = gen.len();
            }
            _ => assert!(
                gen.len() > 1 && gen.len() < layer_by_layer,
                "{} pieces",
                gen.len()
            ),
        }
        assert_eq!(
            [got.d_loss, got.rec, got.adv, got.g_loss],
            [want.d_loss, want.rec, want.adv, want.g_loss]
        );
        let w = step.state_dict(&mut ops).unwrap();
        for (k, t) in &want_w.tensors {
            assert_eq!(t.data, w.tensors[k].data, "bucket {bucket}: {k}");
        }
    }
}
