//! Where a ViT-B pretraining step spends its time on the CPU backend under autodiff
//! (profiling aid for BENCHMARKS.md): encoder forward (visible tokens), decoder forward (all
//! tokens), backward, optimiser.
use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use marlin::backend::Cpu;
use marlin::masking::{make_mask, Grid, RngDraws, Strategy};
use marlin::model::{Marlin, MarlinConfig, MaskIndices, Part};
use std::time::Instant;

type B = Autodiff<Cpu>;

fn main() {
    let cfg = MarlinConfig::from_name("marlin_vit_base_ytf").unwrap();
    let dev = Default::default();
    let m = Marlin::<B>::init(&cfg, &[Part::Encoder, Part::Decoder], 0, &dev);
    let b = 2;
    let grid = Grid {
        tubelets: 8,
        grid_h: 14,
        grid_w: 14,
        patch: 16,
    };
    let mut d = RngDraws::new(0);
    let vis: Vec<bool> = (0..b)
        .flat_map(|_| make_mask(Strategy::Random, 0.9, &[], &grid, &mut d))
        .collect();
    let idx = MaskIndices::from_bools(&vis, b).unwrap();
    let clip = Tensor::<B, 5>::random([b, 3, 16, 224, 224], Distribution::Uniform(0.0, 1.0), &dev);
    for round in 0..2 {
        let t0 = Instant::now();
        let (v, mk) = idx.to_tensors::<B>(&dev);
        let x = m.encoder.forward(clip.clone(), v.clone());
        let _ = x.clone().slice_dim(0, 0..1).into_data();
        let t1 = Instant::now();
        let proj = m.enc_dec_proj.as_ref().unwrap().forward(x);
        let y = m.decoder.as_ref().unwrap().forward(proj, v, mk);
        let _ = y.clone().slice_dim(0, 0..1).into_data();
        let t2 = Instant::now();
        let loss = (y.clone() * y).mean();
        let grads = loss.backward();
        let t3 = Instant::now();
        drop(grads);
        println!(
            "round {round}: encoder fwd {:.2} s, decoder fwd {:.2} s, backward {:.2} s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
}
