//! Time P-Net forward on a 480x360-like pyramid on the CPU backend (profiling aid).
use burn::tensor::{Distribution, Tensor};
use marlin::backend::Cpu;
use marlin::face::mtcnn::Mtcnn;
use std::time::Instant;

fn main() {
    let dev = Default::default();
    let m = Mtcnn::<Cpu>::embedded(&dev).unwrap();
    let b: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(16);
    for (h, w) in [
        (217usize, 289usize),
        (154, 205),
        (109, 145),
        (77, 103),
        (55, 73),
        (39, 52),
        (28, 37),
        (20, 26),
        (14, 19),
    ] {
        let x = Tensor::<Cpu, 4>::random([b, 3, h, w], Distribution::Uniform(-1.0, 1.0), &dev);
        let _ = m.pnet.forward(x.clone());
        let t = Instant::now();
        let (r, p) = m.pnet.forward(x);
        let _ = r.into_data();
        let _ = p.into_data();
        println!("{h}x{w} b{b}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
}
