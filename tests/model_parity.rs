//! Numerical parity with marlin-pytorch on fixtures made by `tools/make_model_fixtures.py`:
//! tiny custom configs with every parameter perturbed, two seeds plus a layer-scale and a
//! no-qkv-bias variant. Tolerance: max abs diff <= 1e-4.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use marlin::backend::{Cpu, CpuAutodiff};
use marlin::model::weights::{read_safetensors_file, HostTensor, StateDict};
use marlin::model::{MaskIndices, Part};
use marlin::{Marlin, MarlinConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;
const CASES: [&str; 4] = ["tiny_a", "tiny_b", "tiny_ls", "tiny_nobias"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn io(case: &str) -> BTreeMap<String, HostTensor> {
    read_safetensors_file(&fixture(&format!("{case}.io.safetensors"))).unwrap()
}

fn tensor<B: Backend, const D: usize>(t: &HostTensor, dev: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), dev)
}

fn max_abs_diff<B: Backend, const D: usize>(ours: Tensor<B, D>, peer: &HostTensor) -> f32 {
    assert_eq!(
        ours.dims().to_vec(),
        peer.shape,
        "shape differs from the peer's"
    );
    let ours = ours.into_data().into_vec::<f32>().unwrap();
    ours.iter()
        .zip(&peer.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn mask_indices(io: &BTreeMap<String, HostTensor>) -> MaskIndices {
    let m = &io["mask"];
    let bools: Vec<bool> = m.data.iter().map(|&v| v != 0.0).collect();
    MaskIndices::from_bools(&bools, m.shape[0]).unwrap()
}

fn load(case: &str, file: &str, parts: &[Part]) -> Marlin<Cpu> {
    let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
    Marlin::<Cpu>::load_file(&cfg, &fixture(file), parts, &Default::default())
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
            let scale = peer.data.iter().fold(0f32, |m, v| m.max(v.abs()));
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

/// The plain CPU backend runs each block as one host kernel (`cpu_kernels::block_forward`);
/// under autodiff the same block takes burn's ops for the LayerNorms, Linears and residuals
/// (attention and GELU are the autodiff ops of `cpu_autodiff`). At ViT-B width (768, 12
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
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("host kernel vs generic ops: max abs diff {d:.2e}");
    assert!(d <= 1e-4, "max abs diff {d}");
}
