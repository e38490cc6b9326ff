//! Numerical parity with marlin-pytorch on fixtures made by `tools/make_model_fixtures.py`:
//! tiny custom configs with every parameter perturbed, two seeds plus a layer-scale and a
//! no-qkv-bias variant. Tolerance: max abs diff <= 1e-4.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use marlin::backend::{Cpu, CpuAutodiff};
use marlin::model::weights::{read_safetensors_file, HostTensor, StateDict};
use marlin::model::{MaskIndices, Part};
use marlin::{Marlin, MarlinConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::common;

pub(crate) const TOL: f32 = 1e-4;
pub(crate) const CASES: [&str; 4] = ["tiny_a", "tiny_b", "tiny_ls", "tiny_nobias"];

pub(crate) fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures/model").join(name)
}

pub(crate) fn io(case: &str) -> BTreeMap<String, HostTensor> {
    read_safetensors_file(&fixture(&format!("{case}.io.safetensors"))).unwrap()
}

pub(crate) fn tensor<B: Backend, const D: usize>(t: &HostTensor, dev: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), dev)
}

pub(crate) fn max_abs_diff<B: Backend, const D: usize>(
    ours: Tensor<B, D>,
    peer: &HostTensor,
) -> f32 {
    assert_eq!(
        ours.dims().to_vec(),
        peer.shape,
        "shape differs from the peer's"
    );
    let ours = ours.into_data().into_vec::<f32>().unwrap();
    common::max_abs_diff(&ours, &peer.data).diff
}

pub(crate) fn mask_indices(io: &BTreeMap<String, HostTensor>) -> MaskIndices {
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    MaskIndices::from_bools(&bools, m.shape[0]).unwrap()
}

fn load(case: &str, file: &str, parts: &[Part]) -> Marlin<Cpu> {
    load_on(case, file, parts, &Default::default())
}

/// A fixture model on backend `B`.
pub(crate) fn load_on<B: Backend>(
    case: &str,
    file: &str,
    parts: &[Part],
    dev: &B::Device,
) -> Marlin<B> {
    let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
    Marlin::<B>::load_file(&cfg, &fixture(file), parts, dev)
        .unwrap()
        .0
}

#[test]
fn features_and_reconstruction_match_peer() {
    let dev = Default::default();
    for case in CASES {
        let io = io(case);
        let model = load(case, &format!("{case}.full.pt"), &[Part::Decoder]);
        let clip: Tensor<Cpu, 5> = tensor(&io["clip"], &dev);

        let seq = model.extract_features(clip.clone(), true);
        let d_seq = max_abs_diff(seq, &io["features_seq"]);
        let pooled = model
            .extract_features(clip.clone(), false)
            .squeeze_dim::<2>(1);
        let d_pool = max_abs_diff(pooled, &io["features_pooled"]);
        let idx = mask_indices(&io);
        let pred = model.forward_indices(clip.clone(), &idx).unwrap();
        let d_fwd = max_abs_diff(pred, &io["forward"]);
        let d_tgt = max_abs_diff(model.target(clip, &idx), &io["target"]);
        eprintln!("{case}: max abs diff seq {d_seq:.2e} pooled {d_pool:.2e} forward {d_fwd:.2e}");
        assert!(d_seq <= TOL, "{case}: keep_seq features differ by {d_seq}");
        assert!(d_pool <= TOL, "{case}: pooled features differ by {d_pool}");
        assert!(d_fwd <= TOL, "{case}: reconstruction differs by {d_fwd}");
        assert_eq!(d_tgt, 0.0, "{case}: patchify target differs");
    }
}

#[test]
fn forward_takes_a_bool_mask_tensor() {
    let dev = Default::default();
    let io = io("tiny_a");
    let model = load("tiny_a", "tiny_a.full.pt", &[Part::Decoder]);
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    let mask = Tensor::<Cpu, 2, burn::tensor::Bool>::from_data(
        TensorData::new(bools, m.shape.clone()),
        &dev,
    );
    let pred = model.forward(tensor(&io["clip"], &dev), mask).unwrap();
    assert!(max_abs_diff(pred, &io["forward"]) <= TOL);
}

#[test]
fn every_file_format_gives_the_same_features() {
    let dev = Default::default();
    let io = io("tiny_a");
    let clip: Tensor<Cpu, 5> = tensor(&io["clip"], &dev);
    for file in [
        "tiny_a.encoder.pt",
        "tiny_a.full.pt",
        "tiny_a.ckpt",
        "tiny_a.hf.safetensors",
    ] {
        let model = load("tiny_a", file, &[]);
        let d = max_abs_diff(
            model.extract_features(clip.clone(), true),
            &io["features_seq"],
        );
        assert!(d <= TOL, "{file}: features differ by {d}");
    }
    // Encoder-only vs full vs training checkpoint are told apart.
    let parts = |f: &str| StateDict::load(&fixture(f)).unwrap().parts();
    assert_eq!(parts("tiny_a.encoder.pt"), vec![Part::Encoder]);
    assert_eq!(parts("tiny_a.full.pt"), vec![Part::Encoder, Part::Decoder]);
    assert_eq!(
        parts("tiny_a.ckpt"),
        vec![Part::Encoder, Part::Decoder, Part::Discriminator]
    );
    // The training checkpoint's discriminator loads too.
    let m = load(
        "tiny_a",
        "tiny_a.ckpt",
        &[Part::Decoder, Part::Discriminator],
    );
    assert!(m.discriminator.is_some());
}

#[test]
fn safetensors_round_trip_is_exact() {
    let model = load("tiny_ls", "tiny_ls.full.pt", &[Part::Decoder]);
    let original = StateDict::load(&fixture("tiny_ls.full.pt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ours.safetensors");
    model.to_state_dict().save_safetensors(&out, None).unwrap();
    let back = StateDict::load(&out).unwrap();
    assert_eq!(
        back.tensors.keys().collect::<Vec<_>>(),
        original.tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &original.tensors {
        assert_eq!(&back.tensors[k], t, "{k} changed in the round trip");
    }
}

/// The module tree is the key map: walking an unfilled model gives exactly the peer's keys and
/// shapes, each once, for every variant (layer scale, no q/v bias, the critic of a Lightning
/// checkpoint).
#[test]
fn module_tree_names_every_peer_key_once() {
    let dev = Default::default();
    for (case, file, parts) in [
        (
            "tiny_a",
            "tiny_a.full.pt",
            vec![Part::Encoder, Part::Decoder],
        ),
        (
            "tiny_b",
            "tiny_b.full.pt",
            vec![Part::Encoder, Part::Decoder],
        ),
        (
            "tiny_ls",
            "tiny_ls.full.pt",
            vec![Part::Encoder, Part::Decoder],
        ),
        (
            "tiny_nobias",
            "tiny_nobias.full.pt",
            vec![Part::Encoder, Part::Decoder],
        ),
        (
            "tiny_a",
            "tiny_a.ckpt",
            vec![Part::Encoder, Part::Decoder, Part::Discriminator],
        ),
    ] {
        let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
        let sd = StateDict::load(&fixture(file)).unwrap();
        let slots = Marlin::<Cpu>::new(&cfg, &parts, &dev).slots();
        let mut ours: Vec<(String, Vec<usize>)> = slots
            .iter()
            .map(|(_, s)| (s.key.clone(), s.shape.clone()))
            .collect();
        ours.sort();
        let n = ours.len();
        ours.dedup_by(|a, b| a.0 == b.0);
        assert_eq!(ours.len(), n, "{file}: a key named twice");
        let theirs: Vec<(String, Vec<usize>)> = sd
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        assert_eq!(ours, theirs, "{file}");
    }
}

#[test]
fn mismatched_checkpoints_get_one_clear_error() {
    let dev = Default::default();
    let path = fixture("tiny_a.full.pt");
    let small = MarlinConfig::from_name("marlin_vit_small_ytf").unwrap();
    let e = Marlin::<Cpu>::load_file(&small, &path, &[], &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiny_a.full.pt"), "{e}");
    assert!(
        e.contains("key 'encoder.patch_embedding.projection.weight' has shape [32, 3, 2, 8, 8] but config 'marlin_vit_small_ytf' expects [384, 3, 2, 16, 16]"),
        "{e}"
    );

    // A missing key names the key; an extra one is a warning, not an error.
    let cfg = MarlinConfig::from_yaml_file(&fixture("tiny_a.yaml")).unwrap();
    let mut sd = StateDict::load(&path).unwrap();
    let norm = sd.tensors.remove("encoder.blocks.1.norm2.bias").unwrap();
    let e = Marlin::<Cpu>::from_state_dict(&cfg, &sd, &[], &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing key 'encoder.blocks.1.norm2.bias' (expected shape [32])"),
        "{e}"
    );
    sd.tensors
        .insert("encoder.blocks.1.norm2.bias".into(), norm);
    sd.tensors.insert(
        "encoder.extra.thing".into(),
        HostTensor::new(vec![1], vec![0.0]),
    );
    let (_, report) = Marlin::<Cpu>::from_state_dict(&cfg, &sd, &[], &dev).unwrap();
    assert_eq!(report.unknown_keys, vec!["encoder.extra.thing".to_string()]);

    // Reconstruction from an encoder-only file says which file to use.
    let e = Marlin::<Cpu>::load_file(&cfg, &fixture("tiny_a.encoder.pt"), &[Part::Decoder], &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing key 'decoder.mask_token'") && e.contains("encoder-only"),
        "{e}"
    );

    // Not a checkpoint at all.
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty.pt", &b""[..]),
        ("text.pt", &b"hello world, not torch"[..]),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = StateDict::load(&p).unwrap_err().to_string();
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let mut other = StateDict::new("x");
    other.tensors.insert(
        "resnet.fc.weight".into(),
        HostTensor::new(vec![2], vec![1.0, 2.0]),
    );
    let p = dir.path().join("resnet.safetensors");
    other.save_safetensors(&p, None).unwrap();
    let e = StateDict::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("resnet.safetensors: not a MARLIN checkpoint"),
        "{e}"
    );
    assert!(e.contains("resnet.fc.weight"), "{e}");
}

#[test]
fn reconstruction_gradient_matches_peer() {
    type A = CpuAutodiff;
    let dev = Default::default();
    for case in ["tiny_a", "tiny_ls"] {
        let io = io(case);
        let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
        let (model, _) = Marlin::<A>::load_file(
            &cfg,
            &fixture(&format!("{case}.full.pt")),
            &[Part::Decoder],
            &dev,
        )
        .unwrap();
        let clip: Tensor<A, 5> = tensor(&io["clip"], &dev);
        let idx = mask_indices(&io);
        let pred = model.forward_indices(clip.clone(), &idx).unwrap();
        let target = model.target(clip, &idx);
        let loss = (pred - target).powi_scalar(2).mean();
        let peer_loss = io["loss"].data[0];
        let ours_loss = loss.clone().into_scalar();
        assert!(
            (ours_loss - peer_loss).abs() <= TOL,
            "{case}: loss {ours_loss} vs {peer_loss}"
        );
        let grads = loss.backward();
        let sd_grads = |key: &str| -> Tensor<Cpu, 1> {
            let g = match key {
                "encoder.blocks.0.attn.q_bias" => model.encoder.blocks[0]
                    .attn
                    .q_bias
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .unwrap(),
                "encoder.blocks.1.norm2.weight" => {
                    model.encoder.blocks[1].norm2.gamma.grad(&grads).unwrap()
                }
                "encoder.norm.bias" => model
                    .encoder
                    .norm
                    .beta
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .unwrap(),
                "decoder.head.bias" => model
                    .decoder
                    .as_ref()
                    .unwrap()
                    .head
                    .bias
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .unwrap(),
                "decoder.mask_token" => {
                    let g = model
                        .decoder
                        .as_ref()
                        .unwrap()
                        .mask_token
                        .grad(&grads)
                        .unwrap();
                    return g.flatten(0, 2);
                }
                "enc_dec_proj.weight" => {
                    // burn stores [in, out]; the peer [out, in].
                    let g = model
                        .enc_dec_proj
                        .as_ref()
                        .unwrap()
                        .weight
                        .grad(&grads)
                        .unwrap();
                    return g.transpose().flatten(0, 1);
                }
                _ => unreachable!(),
            };
            g
        };
        for key in [
            "encoder.blocks.0.attn.q_bias",
            "encoder.blocks.1.norm2.weight",
            "encoder.norm.bias",
            "enc_dec_proj.weight",
            "decoder.mask_token",
            "decoder.head.bias",
        ] {
            let peer = &io[&format!("grad.{key}")];
            let flat = HostTensor::new(vec![peer.numel()], peer.data.clone());
            let scale = common::max_abs(&peer.data);
            let d = max_abs_diff(sd_grads(key), &flat);
            eprintln!("{case}: grad {key}: max abs diff {d:.2e} (max |grad| {scale:.2e})");
            assert!(
                d <= TOL.max(1e-4 * scale),
                "{case}: gradient of {key} differs by {d}"
            );
        }
    }
}

#[test]
fn released_encoder_parameter_counts() {
    // Reference model zoo: 22.48M / 87.43M / 305.47M (position table included).
    let dev = Default::default();
    for (name, millions) in [
        ("marlin_vit_small_ytf", 22.48),
        ("marlin_vit_base_ytf", 87.43),
        ("marlin_vit_large_ytf", 305.47),
    ] {
        let cfg = MarlinConfig::from_name(name).unwrap();
        let counted = marlin::model::weights::count_params(&cfg, &[Part::Encoder]);
        assert_eq!(
            (counted as f64 / 1e4).round() / 100.0,
            millions,
            "{name}: {counted} parameters"
        );
        // The built module holds exactly the counted parameters (allocated once).
        use burn::module::Module;
        let model = Marlin::<Cpu>::init(&cfg, &[Part::Encoder], 0, &dev);
        assert_eq!(model.num_params(), counted, "{name}");
    }
}

#[test]
fn videomae_keys_load_as_the_same_model() {
    // tiny_a's full weights under VideoMAE's names (inside a `model.` dict, no position
    // tables), as `pretrain --init` takes them: the same reconstruction as the original keys.
    let sd = StateDict::load(&fixture("tiny_a.full.pt")).unwrap();
    let mut renamed = StateDict::new("videomae");
    for (k, v) in &sd.tensors {
        if k.ends_with("pos_embedding.emb") {
            continue;
        }
        let name = if k == "decoder.mask_token" {
            "mask_token".to_string()
        } else if let Some(r) = k.strip_prefix("enc_dec_proj.") {
            format!("encoder_to_decoder.{r}")
        } else {
            k.replace("patch_embedding.projection", "patch_embed.proj")
                .replace(".mlp.layers.0.linear.", ".mlp.fc1.")
                .replace(".mlp.layers.1.linear.", ".mlp.fc2.")
        };
        renamed.tensors.insert(format!("model.{name}"), v.clone());
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("videomae.safetensors");
    renamed.save_safetensors(&p, None).unwrap();
    let cfg = MarlinConfig::from_yaml_file(&fixture("tiny_a.yaml")).unwrap();
    let dev = Default::default();
    let loaded = StateDict::load(&p).unwrap();
    assert!(loaded.source.contains("VideoMAE"));
    let (a, _) =
        Marlin::<Cpu>::from_state_dict(&cfg, &loaded, &[Part::Encoder, Part::Decoder], &dev)
            .unwrap();
    // The fixture's position tables are perturbed; VideoMAE's are the plain sin-cos tables, so
    // compare with the original keys minus their tables (filled the same way).
    let mut plain = sd.clone();
    plain
        .tensors
        .retain(|k, _| !k.ends_with("pos_embedding.emb"));
    let (b, _) =
        Marlin::<Cpu>::from_state_dict(&cfg, &plain, &[Part::Encoder, Part::Decoder], &dev)
            .unwrap();
    let io = io("tiny_a");
    let idx = mask_indices(&io);
    let ya = a.forward_indices(tensor(&io["clip"], &dev), &idx).unwrap();
    let yb = b.forward_indices(tensor(&io["clip"], &dev), &idx).unwrap();
    let d = max_abs_diff(ya, &marlin::model::load::to_host(&yb));
    assert!(d <= 1e-6, "VideoMAE-keyed model differs by {d}");
}

/// The plain CPU backend runs each block as one host kernel (`kernels::cpu::block_forward`);
/// under autodiff the same block takes burn's ops for the LayerNorms, Linears and residuals
/// (attention and GELU are the autodiff ops of `kernels::cpu_autodiff`). At ViT-B width (768, 12
/// heads, 392 tokens: the matrix products take their blocked paths) both give the same
/// features.
#[test]
fn host_block_kernel_equals_generic_ops_at_vit_b_width() {
    let mut cfg = MarlinConfig::from_name("marlin_vit_base_ytf").unwrap();
    cfg.img_size = 112;
    cfg.encoder.depth = 2;
    let dev = Default::default();
    let host = Marlin::<Cpu>::init(&cfg, &[Part::Encoder], 7, &dev);
    let generic = Marlin::<CpuAutodiff>::init(&cfg, &[Part::Encoder], 7, &dev);
    let n = 3 * 16 * 112 * 112;
    let clip: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let shape = [1, 3, 16, 112, 112];
    let a = host.extract_features(
        Tensor::<Cpu, 5>::from_data(TensorData::new(clip.clone(), shape), &dev),
        true,
    );
    let b = generic.extract_features(
        Tensor::<CpuAutodiff, 5>::from_data(TensorData::new(clip, shape), &dev),
        true,
    );
    assert_eq!(a.dims(), [1, 392, 768]);
    let a: Vec<f32> = a.into_data().into_vec().unwrap();
    let b: Vec<f32> = b.into_data().into_vec().unwrap();
    let d = common::max_abs_diff(&a, &b).diff;
    eprintln!("host kernel vs generic ops: max abs diff {d:.2e}");
    assert!(d <= 1e-4, "max abs diff {d}");
}

/// A NaN or infinity on either side fails every comparison (`f32::max` skips NaN, so a
/// NaN output would otherwise score a perfect 0), and so do different lengths and empty input.
#[test]
fn comparison_helper_fails_on_non_finite_values() {
    let peer = [0.5f32, -1.0, 2.0];
    let w = common::try_max_abs_diff(&[0.5, -1.25, 2.0], &peer).unwrap();
    assert_eq!((w.diff, w.index, w.ours, w.peer), (0.25, 1, -1.25, -1.0));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for i in 0..3 {
            let mut x = peer;
            x[i] = bad;
            let e = common::try_max_abs_diff(&x, &peer).unwrap_err();
            assert!(e.contains(&format!("element {i}")), "{e}");
            let e = common::try_max_abs_diff(&peer, &x).unwrap_err();
            assert!(e.contains(&format!("element {i}")), "{e}");
            let caught = std::panic::catch_unwind(|| common::assert_close("x", &x, &peer, 1.0));
            assert!(caught.is_err(), "assert_close passed {x:?}");
        }
    }
    assert!(common::try_max_abs_diff(&[1.0], &peer).is_err());
    assert!(common::try_max_abs_diff(&[], &[]).is_err());
    let all_nan = [f32::NAN; 3];
    assert!(std::panic::catch_unwind(|| common::max_abs_diff(&all_nan, &all_nan)).is_err());
}

/// Weights and inputs of `tools/make_vitb_fixtures.py`'s formula: 16-bit integers from a
/// splitmix64 stream keyed by the parameter's name (exact in f32 on both sides).
fn formula_draws(key: &str, n: usize) -> impl Iterator<Item = u64> {
    let mut h: u64 = 0xCBF29CE484222325;
    for &b in key.as_bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001B3);
    }
    (1..=n as u64).map(move |i| {
        let mut z = h.wrapping_add(i.wrapping_mul(0x9E3779B97F4A7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        (z ^ (z >> 31)) >> 48
    })
}

fn formula_state_dict(cfg: &MarlinConfig) -> StateDict {
    use marlin::model::weights::param_specs;
    let mut sd = StateDict::new("<formula>");
    for s in param_specs(cfg, &[Part::Encoder]) {
        if s.key.ends_with("pos_embedding.emb") {
            continue; // the fixed sin-cos table, filled in by the loader
        }
        let (offset, step) = if s.key.contains("norm") && s.key.ends_with(".weight") {
            (1.0, 2f32.powi(-17))
        } else if s.key.ends_with("bias") {
            (0.0, 2f32.powi(-18))
        } else {
            (0.0, 2f32.powi(-19))
        };
        let data = formula_draws(&s.key, s.numel())
            .map(|k| offset + (k as f32 - 32768.0) * step)
            .collect();
        sd.tensors
            .insert(s.key.clone(), HostTensor::new(s.shape, data));
    }
    sd
}

/// The formula model of `cfg` and the fixture's two formula clips `[2, 3, 16, 224, 224]`.
fn vitb2_model_and_clips(cfg: &MarlinConfig) -> (Marlin<Cpu>, Tensor<Cpu, 5>) {
    vitb2_on(cfg, &Default::default())
}

/// [`vitb2_model_and_clips`] on backend `B`.
pub(crate) fn vitb2_on<B: Backend>(
    cfg: &MarlinConfig,
    dev: &B::Device,
) -> (Marlin<B>, Tensor<B, 5>) {
    let dev = dev.clone();
    let (model, _) =
        Marlin::<B>::from_state_dict(cfg, &formula_state_dict(cfg), &[], &dev).unwrap();
    let shape = [2, 3, 16, 224, 224];
    let clip: Vec<f32> = formula_draws("input", shape.iter().product())
        .map(|k| k as f32 / 65536.0)
        .collect();
    (model, Tensor::from_data(TensorData::new(clip, shape), &dev))
}

pub(crate) fn vitb2() -> (MarlinConfig, BTreeMap<String, HostTensor>) {
    let cfg = MarlinConfig::from_yaml_file(&fixture("vitb2.yaml")).unwrap();
    assert_eq!(
        (
            cfg.encoder.embed_dim,
            cfg.encoder.num_heads,
            cfg.encoder.depth
        ),
        (768, 12, 2)
    );
    (
        cfg,
        read_safetensors_file(&fixture("vitb2.io.safetensors")).unwrap(),
    )
}

/// The released width (768 wide, 12 heads of 64, 1568 tokens; 2 of ViT-B's 12 blocks) against
/// marlin-pytorch, with weights from a formula on both sides (tools/make_vitb_fixtures.py): on
/// the CPU backend this runs the fused host block kernel at its real size.
#[test]
fn released_width_features_match_peer() {
    let (cfg, io) = vitb2();
    let (model, clip) = vitb2_model_and_clips(&cfg);
    let pooled = model.extract_features(clip.clone(), false);
    assert_eq!(pooled.dims(), [2, 1, 768]);
    let pooled: Vec<f32> = pooled.into_data().into_vec().unwrap();
    common::assert_close("ViT-B width, pooled", &pooled, &io["features"].data, TOL);
    let seq = model.extract_features(clip, true);
    assert_eq!(seq.dims(), [2, 1568, 768]);
    let seq: Vec<f32> = seq.into_data().into_vec().unwrap();
    // The fixture keeps tokens 0, 49, ..., 1519 of each clip.
    let rows: Vec<f32> = (0..2)
        .flat_map(|b| (0..1568).step_by(49).map(move |t| (b, t)))
        .flat_map(|(b, t)| seq[(b * 1568 + t) * 768..(b * 1568 + t + 1) * 768].to_vec())
        .collect();
    assert_eq!(io["seq_rows"].shape, vec![2, 32, 768]);
    common::assert_close("ViT-B width, keep_seq", &rows, &io["seq_rows"].data, TOL);
}

/// `marlin extract` on the shared cropped sample videos against the peer's `extract_video`
/// of the same formula model: window counts and features.
#[test]
fn extract_on_the_shared_samples_matches_peer() {
    let Some(samples) = common::samples() else {
        return;
    };
    let (cfg, io) = vitb2();
    let t = tempfile::tempdir().unwrap();
    let weights = t.path().join("vitb2.safetensors");
    formula_state_dict(&cfg)
        .save_safetensors(&weights, None)
        .unwrap();
    let out = t.path().join("out");
    let names = ["cropped01.mp4", "cropped02.mp4"];
    let mut args: Vec<String> = vec![
        "extract".into(),
        "--config".into(),
        fixture("vitb2.yaml").display().to_string(),
        "--weights".into(),
        weights.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--quiet".into(),
        "--batch-size".into(),
        "3".into(),
    ];
    args.extend(names.iter().map(|n| samples.join(n).display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = common::marlin(&args, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for name in names {
        let ours = common::read(&out.join(name).with_extension("npy"));
        let peer = &io[name];
        assert_eq!(ours.shape(), &peer.shape[..], "{name}: window count");
        let ours: Vec<f32> = ours.iter().copied().collect();
        common::assert_close(&format!("extract {name}"), &ours, &peer.data, TOL);
    }
}

pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `--precision bf16` at the released width against the peer's own bf16 autocast (and its
/// fp32): ours must be as close to fp32 as the peer's bf16 is, give or take bf16's rounding.
/// The precision is a per-process setting, so the check runs in a child test process.
#[test]
fn released_width_bf16_features_are_as_close_to_fp32_as_the_peers_bf16() {
    const NAME: &str =
        "model_parity::released_width_bf16_features_are_as_close_to_fp32_as_the_peers_bf16";
    if std::env::var_os("MARLIN_TEST_BF16_CHILD").is_none() {
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env("MARLIN_TEST_BF16_CHILD", "1")
            // The bf16 kernels also where they are not the default (no AMX).
            .env(marlin::kernels::BF16_WITHOUT_AMX, "1")
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && text.contains("1 passed"), "{text}");
        eprintln!(
            "{}",
            text.lines()
                .filter(|l| l.contains("bf16"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        return;
    }
    let (effective, note) = marlin::kernels::set_cpu_precision(marlin::kernels::Precision::Bf16);
    let (cfg, io) = vitb2();
    let peer_bf16 = read_safetensors_file(&fixture("vitb2.bf16.safetensors")).unwrap();
    let (model, clip) = vitb2_model_and_clips(&cfg);
    let pooled: Vec<f32> = model
        .extract_features(clip, false)
        .into_data()
        .into_vec()
        .unwrap();
    let fp32 = &io["features"].data;
    let ours = common::max_abs_diff(&pooled, fp32).diff;
    if effective == marlin::kernels::Precision::F32 {
        // No AVX-512 BF16: one note and the f32 numbers.
        assert!(note.is_some());
        assert!(ours <= TOL, "the f32 fallback differs by {ours}");
        return;
    }
    let peer = common::max_abs_diff(&peer_bf16["features"].data, fp32).diff;
    let against_peer_bf16 = common::max_abs_diff(&pooled, &peer_bf16["features"].data).diff;
    let (cos_ours, cos_peer) = (
        cosine(&pooled, fp32),
        cosine(&peer_bf16["features"].data, fp32),
    );
    eprintln!(
        "ViT-B width, pooled, bf16 vs fp32: ours max abs {ours:.3e} cosine {cos_ours:.6}; \
         peer's bf16 {peer:.3e} cosine {cos_peer:.6}; ours vs the peer's bf16 {against_peer_bf16:.3e}"
    );
    assert!(ours > 0.0, "bf16 changed nothing");
    assert!(
        ours <= 2.0 * peer + 1e-2,
        "ours {ours} vs the peer's bf16 {peer}"
    );
    assert!(
        cos_ours >= 0.9999 && cos_ours >= cos_peer - 1e-4,
        "cosine {cos_ours} vs {cos_peer}"
    );
    // The kernels door's Linear computes as the fused block does (bf16 operands, f32 sums), so
    // a block run op by op, and `marlin bench --profile`, measure the bf16 path.
    use burn::tensor::Distribution::Default as Uniform;
    let dev = Default::default();
    let x = Tensor::<Cpu, 3>::random([1, 40, 96], Uniform, &dev);
    let w = Tensor::<Cpu, 2>::random([96, 48], Uniform, &dev);
    let b = Tensor::<Cpu, 1>::random([48], Uniform, &dev);
    let door = marlin::kernels::of::<Cpu>().linear(x.clone(), w.clone(), Some(b.clone()));
    let f32: Vec<f32> = burn::tensor::module::linear(x, w, Some(b))
        .into_data()
        .into_vec()
        .unwrap();
    let door: Vec<f32> = door.into_data().into_vec().unwrap();
    let d = common::max_abs_diff(&door, &f32).diff;
    // Sums of 96 products of values in [0, 1): bf16 rounding (2^-9 relative) keeps them within 0.2.
    assert!(
        d > 0.0 && d < 0.2,
        "the door's bf16 Linear differs from f32 by {d}"
    );
}
