//! One pretraining step (critic step, then generator step) from the tiny_a weights, batch and
//! mask equals the same step in PyTorch (tools/make_train_fixtures.py): losses and every
//! updated parameter within 1e-4.

use burn::tensor::{Tensor, TensorData};
use marlin::backend::CpuAutodiff;
use marlin::model::weights::{read_safetensors_file, HostTensor};
use marlin::model::{MaskIndices, Part};
use marlin::train::{LossConfig, Pretrainer};
use marlin::{Marlin, MarlinConfig};
use std::path::Path;

fn fx(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

#[test]
fn one_step_equals_pytorch() {
    let dev = Default::default();
    let mut cfg = MarlinConfig::from_yaml_file(&fx("model/tiny_a.yaml")).unwrap();
    cfg.weight_decay = 0.05;
    if let Some(o) = cfg.optimizer.as_mut() {
        o.betas = [0.9, 0.95];
        o.eps = 1e-8;
    }
    let (model, _) = Marlin::<CpuAutodiff>::load_file(
        &cfg,
        &fx("model/tiny_a.ckpt"),
        &[Part::Encoder, Part::Decoder, Part::Discriminator],
        &dev,
    )
    .unwrap();
    let io = read_safetensors_file(&fx("model/tiny_a.io.safetensors")).unwrap();
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    let clip_h = &io["clip"];
    let clip = Tensor::<CpuAutodiff, 5>::from_data(
        TensorData::new(clip_h.data.clone(), clip_h.shape.clone()),
        &dev,
    );
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    let idx = MaskIndices::from_bools(&bools, m.shape[0]).unwrap();

    let losses = LossConfig {
        adv_loss: true,
        adv_weight: 0.01,
        d_steps: 1,
        g_steps: 1,
    };
    let mut t = Pretrainer::new(model, losses).unwrap();
    let got = t.step(clip, &idx, 1.5e-4).unwrap();
    let scalar = |k: &str| want[k].data[0] as f64;
    let mut worst = 0f64;
    for (name, ours, k) in [
        ("critic loss", got.d_loss, "loss_d"),
        ("reconstruction", got.rec, "rec"),
        ("adversarial", got.adv, "adv"),
        ("generator loss", got.g_loss, "loss_g"),
    ] {
        let d = (ours - scalar(k)).abs();
        eprintln!("{name}: ours {ours:.6}, PyTorch {:.6}", scalar(k));
        assert!(d <= 1e-4, "{name}: {ours} vs {}", scalar(k));
        worst = worst.max(d);
    }
    let sd = t.model().to_state_dict();
    let mut n = 0;
    let mut wmax = 0f32;
    for (k, v) in &want {
        let Some(key) = k.strip_prefix("after.") else {
            continue;
        };
        let ours: &HostTensor = sd
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(ours.shape, v.shape, "{key}");
        let d = ours
            .data
            .iter()
            .zip(&v.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4, "{key}: updated weights differ by {d}");
        wmax = wmax.max(d);
        n += 1;
    }
    eprintln!("{n} parameters after the step: max abs diff {wmax:.2e}; losses {worst:.2e}");
    assert!(n > 40, "compared {n} tensors");
}

/// The gradient of the reconstruction MSE for every generator parameter equals PyTorch's (the
/// step above only pins each weight's update to about lr * sign(grad)). The gradients are read
/// back as the change an SGD step with lr 1 makes.
#[test]
fn reconstruction_gradients_equal_pytorch() {
    use burn::optim::{GradientsParams, Optimizer, SgdConfig};
    let dev = Default::default();
    let cfg = MarlinConfig::from_yaml_file(&fx("model/tiny_a.yaml")).unwrap();
    let (model, _) = Marlin::<CpuAutodiff>::load_file(
        &cfg,
        &fx("model/tiny_a.ckpt"),
        &[Part::Encoder, Part::Decoder],
        &dev,
    )
    .unwrap();
    let io = read_safetensors_file(&fx("model/tiny_a.io.safetensors")).unwrap();
    let want = read_safetensors_file(&fx("train/step.safetensors")).unwrap();
    let clip_h = &io["clip"];
    let clip = Tensor::<CpuAutodiff, 5>::from_data(
        TensorData::new(clip_h.data.clone(), clip_h.shape.clone()),
        &dev,
    );
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    let idx = MaskIndices::from_bools(&bools, m.shape[0]).unwrap();
    let before = model.to_state_dict();
    let diff = model.forward_indices(clip.clone(), &idx).unwrap() - model.target(clip, &idx);
    let loss = (diff.clone() * diff).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut sgd = SgdConfig::new().init::<CpuAutodiff, Marlin<CpuAutodiff>>();
    let after = sgd.step(1.0, model, grads).to_state_dict();
    let mut n = 0;
    for (k, g) in &want {
        let Some(key) = k.strip_prefix("grad.") else {
            continue;
        };
        let (b, a) = (&before.tensors[key], &after.tensors[key]);
        let scale = g.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = b
            .data
            .iter()
            .zip(&a.data)
            .zip(&g.data)
            .map(|((b, a), g)| ((b - a) - g).abs())
            .fold(0f32, f32::max);
        eprintln!("{key}: max |grad| {scale:.3e}, max abs diff {d:.2e}");
        assert!(
            d <= 1e-4 * scale.max(1e-2),
            "{key}: gradient differs by {d} (max |grad| {scale})"
        );
        n += 1;
    }
    assert!(n > 40, "compared {n} gradients");
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

    let ours = marlin::model::cpu_autodiff::attention(qkv.clone(), h, scale)
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
        a.iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let fwd = diff(ours.inner(), generic.inner());
    let grad = diff(qkv.grad(&g_ours).unwrap(), qkv.grad(&g_gen).unwrap());
    eprintln!("attention op vs burn: output {fwd:.2e}, d qkv {grad:.2e}");
    assert!(fwd <= 1e-5 && grad <= 1e-4, "output {fwd}, gradient {grad}");
}
