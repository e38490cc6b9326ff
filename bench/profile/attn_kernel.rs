//! Times the CPU attention kernel alone at ViT-B size (1568 tokens, 12 heads of 64).
use std::time::Instant;
fn main() {
    let (b, n, h, hd) = (1, 1568, 12, 64);
    let qkv: Vec<f32> = (0..b * n * 3 * h * hd)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let _ = marlin::kernels::cpu::attention(&qkv, b, n, h, hd, 0.125);
    let t = Instant::now();
    for _ in 0..5 {
        let _ = marlin::kernels::cpu::attention(&qkv, b, n, h, hd, 0.125);
    }
    println!(
        "attention kernel: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / 5.0
    );
    let mut h: Vec<f32> = (0..n * 3072)
        .map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0)
        .collect();
    let t = Instant::now();
    for _ in 0..5 {
        marlin::kernels::cpu::gelu_in_place(&mut h);
    }
    println!(
        "gelu kernel (1568 x 3072): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3 / 5.0
    );
}
