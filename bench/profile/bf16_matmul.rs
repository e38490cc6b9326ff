//! Times the CPU matrix products of a ViT-B block at 1568 tokens: f32 (gemm) against bf16
//! (`kernels::bf16`), with the bf16 packing alone. `cargo run --release --features profile
//! --example bf16_matmul`.
use std::time::Instant;

fn main() {
    let (m, iters) = (
        1568,
        std::env::var("ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    {
        let qkv: Vec<f32> = (0..m * 2304)
            .map(|i| (i % 113) as f32 / 113.0 - 0.5)
            .collect();
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(marlin::kernels::cpu::attention(&qkv, 1, m, 12, 64, 0.125));
        }
        println!(
            "attention [1, {m}, 12 heads x 64]: {:.1} ms",
            t.elapsed().as_secs_f64() / iters as f64 * 1e3
        );
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(marlin::kernels::cpu::attention_bf16(
                &qkv, 1, m, 12, 64, 0.125,
            ));
        }
        println!(
            "attention bf16: {:.1} ms",
            t.elapsed().as_secs_f64() / iters as f64 * 1e3
        );
        let mut h: Vec<f32> = (0..m * 3072)
            .map(|i| (i % 101) as f32 / 50.0 - 1.0)
            .collect();
        let t = Instant::now();
        for _ in 0..iters {
            marlin::kernels::cpu::gelu_in_place(&mut h);
        }
        println!(
            "gelu [{m}, 3072]: {:.1} ms",
            t.elapsed().as_secs_f64() / iters as f64 * 1e3
        );
    }
    if std::env::var_os("ATTENTION_ONLY").is_some() {
        return;
    }
    for [k, n] in [[768, 2304], [768, 768], [768, 3072], [3072, 768]] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 / 97.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 89) as f32 / 89.0 - 0.5).collect();
        let mut c = vec![0f32; m * n];
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64 * 1e3
        };
        marlin::kernels::set_cpu_precision(marlin::kernels::Precision::F32);
        let f32_ms = time(&mut || marlin::kernels::cpu::matmul_f32(&mut c, &a, &w, [m, k, n]));
        let bf16_ms = time(&mut || marlin::kernels::bf16::matmul(&mut c, &a, &w, [m, k, n], false));
        let bp = marlin::kernels::bf16::panels(&w, k, n);
        let packed_ms =
            time(&mut || marlin::kernels::bf16::matmul_panels(&mut c, &a, &bp, [m, k, n], false));
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "[{m}x{k}] x [{k}x{n}]: f32 {f32_ms:.1} ms ({:.0} GFLOP/s), bf16 {bf16_ms:.1} ms ({:.0} GFLOP/s), from kept panels {packed_ms:.1} ms ({:.0} GFLOP/s)",
            gflop / f32_ms * 1e3,
            gflop / bf16_ms * 1e3,
            gflop / packed_ms * 1e3
        );
    }
}
