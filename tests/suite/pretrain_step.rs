//! One pretraining step (critic step, then generator step) from the tiny_a weights, batch and
//! mask equals the same step in PyTorch (tools/make_train_fixtures.py): losses and every
//! updated parameter within 1e-4.

use burn::tensor::{Tensor, TensorData};
use marlin::backend::CpuAutodiff;
use marlin::model::weights::{read_safetensors_file, HostTensor};
use marlin::model::{MaskIndices, Part};
use marlin::train::{LossConfig, Pretrainer};
use marlin::{Marlin, MarlinConfig};

use crate::common;
use std::collections::BTreeMap;

pub(crate) fn fx(p: &str) -> std::path::PathBuf {
    common::repo().join("tests/fixtures").join(p)
}

#[test]
fn one_step_equals_pytorch() {
    let (model, clip, idx) = tiny_a_batch();
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    let (t, got) = fixture_step(model, clip, &idx);
    let mut worst = 0f64;
    for (name, ours, peer) in loss_pairs(&got, &want) {
        let d = (ours - peer).abs();
        eprintln!("{name}: ours {ours:.6}, PyTorch {peer:.6}");
        assert!(d <= 1e-4, "{name}: {ours} vs {peer}");
        worst = worst.max(d);
    }
    let diffs = weight_diffs(&t.model().to_state_dict(), &want);
    let mut wmax = 0f32;
    for (key, d) in &diffs {
        assert!(*d <= 1e-4, "{key}: updated weights differ by {d}");
        wmax = wmax.max(*d);
    }
    let n = diffs.len();
    eprintln!("{n} parameters after the step: max abs diff {wmax:.2e}; losses {worst:.2e}");
    assert!(n > 40, "compared {n} tensors");
}

/// One step of `model` with the step fixture's settings (critic, then generator; AdvLoss 0.01,
/// no gradient penalty, lr 1.5e-4).
pub(crate) fn fixture_step<B: burn::tensor::backend::AutodiffBackend>(
    model: Marlin<B>,
    clip: Tensor<B, 5>,
    idx: &MaskIndices,
) -> (Pretrainer<B>, marlin::train::StepLosses) {
    let losses = LossConfig {
        adv_loss: true,
        adv_weight: 0.01,
        gp_weight: 0.0,
        d_steps: 1,
        g_steps: 1,
    };
    let mut t = Pretrainer::new(model, losses).unwrap();
    let got = t.step(clip, idx, 1.5e-4, 0).unwrap();
    (t, got)
}

/// (name, ours, the peer's) for each loss of the step fixture.
pub(crate) fn loss_pairs(
    got: &marlin::train::StepLosses,
    want: &BTreeMap<String, HostTensor>,
) -> [(&'static str, f64, f64); 4] {
    let peer = |k: &str| want[k].data[0] as f64;
    [
        ("critic loss", got.d_loss, peer("loss_d")),
        ("reconstruction", got.rec, peer("rec")),
        ("adversarial", got.adv, peer("adv")),
        ("generator loss", got.g_loss, peer("loss_g")),
    ]
}

/// (key, max abs diff) of every parameter the step fixture holds after its step (`after.*`).
pub(crate) fn weight_diffs(
    sd: &marlin::model::weights::StateDict,
    want: &BTreeMap<String, HostTensor>,
) -> Vec<(String, f32)> {
    want.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("after.")?, v)))
        .map(|(key, v)| {
            let ours: &HostTensor = sd
                .tensors
                .get(key)
                .unwrap_or_else(|| panic!("{key} missing"));
            assert_eq!(ours.shape, v.shape, "{key}");
            (
                key.to_string(),
                common::max_abs_diff(&ours.data, &v.data).diff,
            )
        })
        .collect()
}

/// The gradient of the reconstruction MSE for every generator parameter equals PyTorch's (the
/// step above only pins each weight's update to about lr * sign(grad)). The gradients are read
/// back as the change an SGD step with lr 1 makes.
#[test]
fn reconstruction_gradients_equal_pytorch() {
    let n = reconstruction_gradients_match::<CpuAutodiff>(&Default::default());
    assert!(n > 40, "compared {n} gradients");
}

/// [`reconstruction_gradients_equal_pytorch`] on backend `B` (its autodiff): asserts each
/// gradient within 1e-4 of the larger of its max |grad| and 1e-2; returns how many it compared.
// `!(d <= tol)` on purpose: a NaN fails it.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn reconstruction_gradients_match<B: burn::tensor::backend::AutodiffBackend>(
    dev: &B::Device,
) -> usize {
    use burn::optim::{GradientsParams, Optimizer, SgdConfig};
    let (mut model, clip, idx) = tiny_a_batch_on::<B>(dev);
    model.discriminator = None;
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    let before = model.to_state_dict();
    let diff = model.forward_indices(clip.clone(), &idx).unwrap() - model.target(clip, &idx);
    let loss = (diff.clone() * diff).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut sgd = SgdConfig::new().init::<B, Marlin<B>>();
    let after = sgd.step(1.0, model, grads).to_state_dict();
    let mut n = 0;
    let mut failures = Vec::new();
    for (k, g) in &want {
        let Some(key) = k.strip_prefix("grad.") else {
            continue;
        };
        let (b, a) = (&before.tensors[key], &after.tensors[key]);
        let scale = common::max_abs(&g.data);
        let update: Vec<f32> = b.data.iter().zip(&a.data).map(|(b, a)| b - a).collect();
        let d = common::max_abs_diff(&update, &g.data);
        eprintln!("{key}: max |grad| {scale:.3e}, max abs diff {:.2e}", d.diff);
        if !(d.diff <= 1e-4 * scale.max(1e-2)) {
            failures.push(format!(
                "{key}: gradient differs by {} at {} (ours {}, PyTorch {}; max |grad| {scale})",
                d.diff, d.index, d.ours, d.peer
            ));
        }
        n += 1;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    n
}

/// The CPU attention autodiff op (one op, its own backward kernel, query rows in blocks of
/// 512) against burn's generic attention under autodiff, at 600 tokens (two row blocks):
/// outputs and the gradient of the fused qkv input.
#[test]
fn cpu_attention_op_equals_burns_generic_attention() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let dev = Default::default();
    let (b, n, h, hd) = (2, 600, 2, 16);
    let d = h * hd;
    let scale = (hd as f32).powf(-0.5);
    let data = |len: usize, k: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * k) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    };
    let qkv = Tensor::<CpuAutodiff, 3>::from_data(
        TensorData::new(data(b * n * 3 * d, 7919), [b, n, 3 * d]),
        &dev,
    )
    .require_grad();
    let w = Tensor::<CpuAutodiff, 3>::from_data(
        TensorData::new(data(b * n * d, 104_729), [b, n, d]),
        &dev,
    );

    let ours = marlin::kernels::cpu_autodiff::attention(qkv.clone(), h, scale)
        .unwrap_or_else(|_| panic!("CpuAutodiff takes the CPU attention op"));
    let g_ours = (ours.clone() * w.clone()).sum().backward();

    let parts = qkv
        .clone()
        .reshape([b, n, 3, h, hd])
        .permute([2, 0, 3, 1, 4]);
    let mut it = parts.chunk(3, 0).into_iter().map(|t| t.squeeze_dim::<4>(0));
    let (q, k, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let opts = AttentionModuleOptions {
        scale: Some(scale as f64),
        softcap: None,
        is_causal: false,
    };
    let generic = attention(q, k, v, None, None, opts)
        .swap_dims(1, 2)
        .reshape([b, n, d]);
    let g_gen = (generic.clone() * w).sum().backward();

    let diff = |a: Tensor<burn::backend::Flex, 3>, c: Tensor<burn::backend::Flex, 3>| {
        let a: Vec<f32> = a.into_data().into_vec().unwrap();
        let c: Vec<f32> = c.into_data().into_vec().unwrap();
        common::max_abs_diff(&a, &c).diff
    };
    let fwd = diff(ours.inner(), generic.inner());
    let grad = diff(qkv.grad(&g_ours).unwrap(), qkv.grad(&g_gen).unwrap());
    eprintln!("attention op vs burn: output {fwd:.2e}, d qkv {grad:.2e}");
    assert!(fwd <= 1e-5 && grad <= 1e-4, "output {fwd}, gradient {grad}");
}

/// The tiny_a model (all parts, AdamW as the fixtures), its batch and mask.
fn tiny_a_batch() -> (Marlin<CpuAutodiff>, Tensor<CpuAutodiff, 5>, MaskIndices) {
    tiny_a_batch_on(&Default::default())
}

/// [`tiny_a_batch`] on backend `B`.
pub(crate) fn tiny_a_batch_on<B: burn::tensor::backend::Backend>(
    dev: &B::Device,
) -> (Marlin<B>, Tensor<B, 5>, MaskIndices) {
    let mut cfg = MarlinConfig::from_yaml_file(&fx("model/tiny_a.yaml")).unwrap();
    cfg.weight_decay = 0.05;
    if let Some(o) = cfg.optimizer.as_mut() {
        o.betas = [0.9, 0.95];
        o.eps = 1e-8;
    }
    let (model, _) = Marlin::<B>::load_file(
        &cfg,
        &fx("model/tiny_a.ckpt"),
        &[Part::Encoder, Part::Decoder, Part::Discriminator],
        dev,
    )
    .unwrap();
    let io = read_safetensors_file(&fx("model/tiny_a.io.safetensors")).unwrap();
    let clip_h = &io["clip"];
    let clip = Tensor::<B, 5>::from_data(
        TensorData::new(clip_h.data.clone(), clip_h.shape.clone()),
        dev,
    );
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    let idx = MaskIndices::from_bools(&bools, m.shape[0]).unwrap();
    (model, clip, idx)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff(a, b).diff
}

/// The gradient penalty (gp_weight 10) without second-order autodiff: the critic loss, the
/// penalty and the critic's gradients equal PyTorch's double backpropagation
/// (`torch.autograd.grad(..., create_graph=True)`), and a whole step (critic then generator)
/// ends with the same weights.
#[test]
fn gradient_penalty_equals_double_backpropagation() {
    use burn::optim::{GradientsParams, Optimizer, SgdConfig};
    use marlin::model::discriminator::Discriminator;
    let want = read_safetensors_file(&fx("train/step_gp.safetensors")).unwrap();
    let alpha = marlin::train::gp_alpha(12345, 0);
    assert!(
        (alpha - want["alpha"].data[0]).abs() < 1e-7,
        "same draw as the fixture"
    );

    // Loss and gradients at the initial weights.
    let (mut model, clip, idx) = tiny_a_batch();
    let critic = model.discriminator.take().unwrap();
    let real = model.target(clip.clone(), &idx);
    let pred = model.forward_indices(clip.clone(), &idx).unwrap().detach();
    let interp = real.clone().mul_scalar(alpha) + pred.clone().mul_scalar(1.0 - alpha);
    let g = critic.input_gradient(interp);
    let gp = (g.clone() * g)
        .sum_dim(2)
        .sqrt()
        .sub_scalar(1.0)
        .powi_scalar(2)
        .mean();
    let loss =
        critic.forward(pred).mean() - critic.forward(real).mean() + gp.clone().mul_scalar(10.0);
    let scalar = |t: Tensor<CpuAutodiff, 1>| t.into_data().into_vec::<f32>().unwrap()[0];
    let (gp_v, loss_v) = (scalar(gp), scalar(loss.clone()));
    eprintln!(
        "gp ours {gp_v:.6} PyTorch {:.6}; critic loss ours {loss_v:.6} PyTorch {:.6}",
        want["gp"].data[0], want["loss_d"].data[0]
    );
    assert!((gp_v - want["gp"].data[0]).abs() <= 1e-5);
    assert!((loss_v - want["loss_d"].data[0]).abs() <= 1e-4);
    let grads = GradientsParams::from_grads(loss.backward(), &critic);
    let before = critic.clone();
    let mut sgd = SgdConfig::new().init::<CpuAutodiff, Discriminator<CpuAutodiff>>();
    let after = sgd.step(1.0, critic, grads);
    let host = |t: Tensor<CpuAutodiff, 2>| -> Vec<f32> { t.into_data().into_vec().unwrap() };
    let host1 = |t: Tensor<CpuAutodiff, 1>| -> Vec<f32> { t.into_data().into_vec().unwrap() };
    // burn Linear weights are [in, out]; torch's are [out, in].
    let t = |t: Tensor<CpuAutodiff, 2>| t.transpose();
    let checks = [
        (
            "discriminator.layers.0.linear.weight",
            host(t(before.fc1.weight.val()) - t(after.fc1.weight.val())),
        ),
        (
            "discriminator.layers.0.linear.bias",
            host1(before.fc1.bias.as_ref().unwrap().val() - after.fc1.bias.as_ref().unwrap().val()),
        ),
        (
            "discriminator.layers.1.linear.weight",
            host(t(before.fc2.weight.val()) - t(after.fc2.weight.val())),
        ),
        (
            "discriminator.layers.1.linear.bias",
            host1(before.fc2.bias.as_ref().unwrap().val() - after.fc2.bias.as_ref().unwrap().val()),
        ),
    ];
    for (name, ours) in checks {
        let w = &want[&format!("grad.{name}")].data;
        let scale = common::max_abs(w);
        let d = max_diff(&ours, w);
        eprintln!("{name}: max |grad| {scale:.3e}, max abs diff {d:.2e}");
        assert!(d <= 1e-4 * scale.max(1e-2), "{name}: {d}");
    }

    // A whole step with the penalty.
    let (model, clip, idx) = tiny_a_batch();
    let losses = LossConfig {
        adv_loss: true,
        adv_weight: 0.01,
        gp_weight: 10.0,
        d_steps: 1,
        g_steps: 1,
    };
    let mut tr = Pretrainer::new(model, losses).unwrap();
    let got = tr.step(clip, &idx, 1.5e-4, 12345).unwrap();
    assert!(
        (got.d_loss - want["loss_d"].data[0] as f64).abs() <= 1e-4,
        "{got:?}"
    );
    assert!(
        (got.g_loss - want["loss_g"].data[0] as f64).abs() <= 1e-4,
        "{got:?}"
    );
    let sd = tr.model().to_state_dict();
    let mut n = 0;
    for (k, v) in &want {
        if let Some(key) = k.strip_prefix("after.") {
            let d = max_diff(&sd.tensors[key].data, &v.data);
            assert!(d <= 1e-4, "{key}: updated weights differ by {d}");
            n += 1;
        }
    }
    assert!(n > 40, "compared {n} tensors");
}

/// A batch whose losses are not finite (a NaN pixel) changes no weight and says so; the next
/// good batch trains as usual.
#[test]
fn a_non_finite_loss_skips_the_update() {
    let (model, clip, idx) = tiny_a_batch();
    let losses = LossConfig {
        adv_loss: true,
        adv_weight: 0.01,
        gp_weight: 10.0,
        d_steps: 1,
        g_steps: 1,
    };
    let before = model.to_state_dict();
    let mut t = Pretrainer::new(model, losses).unwrap();
    let bad = clip.clone().mul_scalar(f32::NAN);
    let l = t.step(bad, &idx, 1.5e-4, 0).unwrap();
    assert!(l.skipped, "{l:?}");
    assert!(!l.g_loss.is_finite() && !l.d_loss.is_finite(), "{l:?}");
    let after = t.model().to_state_dict();
    for (k, v) in &before.tensors {
        assert!(
            v.data == after.tensors[k].data,
            "{k} changed on a skipped step"
        );
    }
    let l = t.step(clip, &idx, 1.5e-4, 0).unwrap();
    assert!(!l.skipped && l.g_loss.is_finite(), "{l:?}");
    let trained = t.model().to_state_dict();
    let changed = before
        .tensors
        .iter()
        .filter(|(k, v)| v.data != trained.tensors[*k].data)
        .count();
    assert!(changed > 40, "{changed} tensors changed after a good step");
}
