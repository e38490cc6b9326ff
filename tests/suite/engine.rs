//! The engine's schedule (the one the CUDA engine runs) on the host kernels, against the
//! peer's fixtures: the tiny configs (two seeds, layer scale, no qkv bias; keep_seq and pooled)
//! and the released width (768 wide, 12 heads, 1568 tokens). Every layout decision of the
//! schedule (buffers, the fused qkv bias, layer scale folded into the Linears, positions added
//! in block 0's LayerNorm, mean pooling before the final LayerNorm) is checked here without a
//! GPU. Tolerance: max abs diff <= 1e-4, as the model's own parity tests.

use crate::common;
use crate::model_parity::{fixture, io, vitb2, CASES, TOL};
use marlin::backend::Cpu;
use marlin::engine::host::HostEngine;
use marlin::engine::{EncoderWeights, FeatureEngine};
use marlin::kernels::Precision;
use marlin::model::weights::HostTensor;
use marlin::model::Part;
use marlin::{Marlin, MarlinConfig};

fn clips(t: &HostTensor) -> Vec<&[f32]> {
    let per: usize = t.shape[1..].iter().product();
    t.data.chunks(per).collect()
}

fn engine_of(m: &Marlin<Cpu>, p: Precision) -> HostEngine {
    HostEngine::new(EncoderWeights::of_model(m), p)
}

#[test]
fn the_schedule_on_the_host_matches_the_peer() {
    for case in CASES {
        let io = io(case);
        let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
        let (model, _) = Marlin::<Cpu>::load_file(
            &cfg,
            &fixture(&format!("{case}.full.pt")),
            &[Part::Encoder],
            &Default::default(),
        )
        .unwrap();
        let e = engine_of(&model, Precision::F32);
        let c = clips(&io["clip"]);
        let (seq, shape) = marlin::engine::features(&e, &c, true).unwrap();
        assert_eq!(
            shape.to_vec(),
            io["features_seq"].shape,
            "{case}: keep_seq shape"
        );
        let d_seq = common::max_abs_diff(&seq, &io["features_seq"].data).diff;
        let (pooled, shape) = marlin::engine::features(&e, &c, false).unwrap();
        assert_eq!(shape[1], 1, "{case}: pooled is one row per clip");
        let d_pool = common::max_abs_diff(&pooled, &io["features_pooled"].data).diff;
        eprintln!("{case}: keep_seq {d_seq:.2e} pooled {d_pool:.2e}");
        assert!(d_seq <= TOL && d_pool <= TOL, "{case}: {d_seq} {d_pool}");
    }
}

#[test]
fn the_schedule_at_the_released_width_matches_the_peer_and_burns_ops() {
    let (cfg, io) = vitb2();
    let (model, clip) = crate::model_parity::vitb2_on::<Cpu>(&cfg, &Default::default());
    let e = engine_of(&model, Precision::F32);
    let data: Vec<f32> = clip.clone().into_data().into_vec().unwrap();
    let per = data.len() / 2;
    let c: Vec<&[f32]> = data.chunks(per).collect();
    let (pooled, shape) = marlin::engine::features(&e, &c, false).unwrap();
    assert_eq!(shape, [2, 1, 768]);
    common::assert_close(
        "engine, ViT-B width, pooled",
        &pooled,
        &io["features"].data,
        TOL,
    );
    let (seq, shape) = marlin::engine::features(&e, &c, true).unwrap();
    assert_eq!(shape, [2, 1568, 768]);
    let rows: Vec<f32> = (0..2)
        .flat_map(|b| (0..1568).step_by(49).map(move |t| (b, t)))
        .flat_map(|(b, t)| seq[(b * 1568 + t) * 768..(b * 1568 + t + 1) * 768].to_vec())
        .collect();
    common::assert_close(
        "engine, ViT-B width, keep_seq",
        &rows,
        &io["seq_rows"].data,
        TOL,
    );
    // The same arithmetic as burn's ops with the fused host block: within f32 rounding.
    let burn: Vec<f32> = model
        .extract_features(clip, false)
        .into_data()
        .into_vec()
        .unwrap();
    let d = common::max_abs_diff(&pooled, &burn).diff;
    assert!(d <= 1e-5, "engine vs burn's ops: {d}");
}

/// A model with an engine extracts through it: `extract_video` and `try_extract_clips` give
/// the engine's numbers (not burn's unfilled encoder's zeros).
#[test]
fn a_model_with_an_engine_extracts_through_it() {
    let dir = common::fixtures();
    let cfg = MarlinConfig::from_yaml_file(&dir.join("tiny224.yaml")).unwrap();
    let sd = marlin::model::StateDict::load(&dir.join("tiny224.pt")).unwrap();
    let (burn, _) =
        Marlin::<Cpu>::from_state_dict(&cfg, &sd, &[Part::Encoder], &Default::default()).unwrap();
    let (with_engine, _, note) = marlin::engine::load_for_features::<Cpu>(
        &cfg,
        &sd,
        &Default::default(),
        marlin::backend::DeviceSpec::Cpu,
        Precision::F32,
    )
    .unwrap();
    assert!(note.is_none(), "{note:?}");
    let e = with_engine
        .engine
        .as_ref()
        .expect("the CPU extracts on the host engine");
    assert_eq!(e.precision(), Precision::F32);
    assert_eq!(e.clip_size(), (16, 224));
    let opts = marlin::extract::ExtractOptions {
        batch_size: 2,
        ..Default::default()
    };
    let video = dir.join("h264_100.mp4");
    let (a, sa) = burn.extract_video(&video, &opts).unwrap();
    let (b, sb) = with_engine.extract_video(&video, &opts).unwrap();
    assert_eq!((a.shape(), sa.clips), (b.shape(), sb.clips));
    let (a, b): (Vec<f32>, Vec<f32>) = (a.iter().copied().collect(), b.iter().copied().collect());
    let d = common::max_abs_diff(&a, &b).diff;
    assert!(d <= 1e-5, "engine vs burn: {d}");
    assert!(b.iter().any(|v| *v != 0.0));
}

/// Precision belongs to an engine: an f32 and a bf16 engine in one process each keep theirs
/// (the CPU computes bf16 where it can; elsewhere the bf16 engine says f32).
#[test]
fn each_engine_keeps_its_precision() {
    let (cfg, _) = vitb2();
    let (model, clip) = crate::model_parity::vitb2_on::<Cpu>(&cfg, &Default::default());
    let data: Vec<f32> = clip.into_data().into_vec().unwrap();
    let c: Vec<&[f32]> = data.chunks(data.len() / 2).take(1).collect();
    let f32_engine = engine_of(&model, Precision::F32);
    let (want, note) = marlin::kernels::cpu_effective_precision(Precision::Bf16);
    let bf16_engine = engine_of(&model, want);
    assert_eq!(bf16_engine.precision(), want, "{note:?}");
    let (a, _) = marlin::engine::features(&f32_engine, &c, false).unwrap();
    let (b, _) = marlin::engine::features(&bf16_engine, &c, false).unwrap();
    let (a2, _) = marlin::engine::features(&f32_engine, &c, false).unwrap();
    assert_eq!(
        a, a2,
        "the f32 engine's numbers changed after a bf16 engine ran"
    );
    let d = common::max_abs_diff(&a, &b).diff;
    if want == Precision::Bf16 {
        assert!(d > 0.0 && d < 5e-2, "bf16 vs f32: {d}");
    } else {
        assert_eq!(d, 0.0);
    }
    // The process-wide setting (burn's path) is untouched.
    assert_eq!(marlin::kernels::cpu_precision(), Precision::F32);
}

#[test]
fn clips_of_the_wrong_size_are_an_error_not_a_panic() {
    let case = CASES[0];
    let cfg = MarlinConfig::from_yaml_file(&fixture(&format!("{case}.yaml"))).unwrap();
    let model = Marlin::<Cpu>::init(&cfg, &[Part::Encoder], 0, &Default::default());
    let e = engine_of(&model, Precision::F32);
    let short = vec![0.5f32; 10];
    let err = e
        .submit(&[short.as_slice()], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a clip of 10 values"), "{err}");
}
