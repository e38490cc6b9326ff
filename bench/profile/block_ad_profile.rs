//! Time the parts of one decoder block (ViT-B decoder shapes, batch 2, 1568 tokens) under
//! autodiff on the CPU: forward parts and the backward of the whole block.
use burn::backend::Autodiff;
use burn::tensor::{Distribution, Tensor};
use marlin::backend::Cpu;
use marlin::model::{Marlin, MarlinConfig, Part};
use std::time::Instant;

type B = Autodiff<Cpu>;

fn sync(t: &Tensor<B, 3>) {
    let _ = t.clone().slice_dim(0, 0..1).into_data();
}

fn main() {
    let cfg = MarlinConfig::from_name("marlin_vit_base_ytf").unwrap();
    let dev = Default::default();
    let m = Marlin::<B>::init(&cfg, &[Part::Encoder, Part::Decoder], 0, &dev);
    let blk = &m.decoder.as_ref().unwrap().blocks[0];
    let x = Tensor::<B, 3>::random([2, 1568, 384], Distribution::Uniform(-1.0, 1.0), &dev)
        .require_grad();
    for _ in 0..2 {
        let time = |label: &str, f: &dyn Fn() -> Tensor<B, 3>| {
            let t = Instant::now();
            let y = f();
            sync(&y);
            println!("{label:<24} {:>8.1} ms", t.elapsed().as_secs_f64() * 1e3);
            y
        };
        let h = time("norm1", &|| blk.norm1.forward(x.clone()));
        let q = time("qkv linear", &|| blk.attn.qkv.forward(h.clone()));
        let a = time("attn module", &|| blk.attn.forward(h.clone()));
        let _ = time("proj", &|| blk.attn.proj.forward(a.clone()));
        let _ = time("residual add", &|| x.clone() + a.clone());
        let f = time("fc1", &|| blk.mlp.fc1.forward(h.clone()));
        let _ = time("gelu (burn)", &|| burn::tensor::activation::gelu(f.clone()));
        let _ = time("mlp module", &|| blk.mlp.forward(h.clone()));
        drop(q);
        let y = time("whole block", &|| blk.forward(x.clone()));
        let t = Instant::now();
        let g = (y.clone() * y).mean().backward();
        println!(
            "{:<24} {:>8.1} ms",
            "block backward",
            t.elapsed().as_secs_f64() * 1e3
        );
        let t = Instant::now();
        let n = blk.norm1.forward(x.clone());
        let g2 = (n.clone() * n).mean().backward();
        println!(
            "{:<24} {:>8.1} ms (fwd+bwd)",
            "norm1 alone",
            t.elapsed().as_secs_f64() * 1e3
        );
        drop((g, g2));
    }
}
