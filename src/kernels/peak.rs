//! The machine's limit for the CPU kernels: the f32 fused multiply-add peak of this process's
//! threads, measured (not read off a datasheet: clocks under AVX-512 load differ from the
//! label), and the floating-point work of an encoder forward, so `marlin bench` can say how
//! close each kernel comes to that limit.

use rayon::prelude::*;
use std::time::Instant;

/// The measured f32 FMA peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Billions of floating-point operations per second (an FMA counts two), all threads.
    pub gflops: f64,
    /// Threads that ran (rayon's pool: `RAYON_NUM_THREADS` or every core).
    pub threads: usize,
    /// The widest FMA the CPU has: "avx512", "avx2" or "scalar".
    pub isa: &'static str,
}

/// Independent accumulators per thread: enough to cover the latency of an FMA or a bf16 dot
/// product on two ports (Zen 5's `vdpbf16ps` needs more than 12: with 12 chains its measured
/// peak was 7% under what the bf16 products reach).
const CHAINS: usize = 24;

/// The f32 FMA peak of rayon's threads: each thread runs `CHAINS` independent FMA chains in
/// the widest registers the CPU has for about `seconds`; the best of three rounds.
pub fn fma_peak(seconds: f64) -> Peak {
    let threads = rayon::current_num_threads();
    let isa = isa();
    let lanes = fma_lanes(isa);
    // Calibrate the iteration count on one thread, then time all threads together.
    let iters = calibrate(seconds, |n| chains(isa, n));
    let best = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let sum: f32 = (0..threads)
                .into_par_iter()
                .map(|_| chains(isa, iters))
                .sum();
            std::hint::black_box(sum);
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let flops = (threads * iters * CHAINS * lanes * 2) as f64;
    Peak {
        gflops: flops / best / 1e9,
        threads,
        isa,
    }
}

/// The bf16 dot-product peak of rayon's threads (`vdpbf16ps`: two multiply-adds per f32 lane
/// per instruction, summed in f32), measured as [`fma_peak`]; `None` where the CPU lacks
/// AVX-512 BF16. Where this is no faster than [`fma_peak`] (Intel cores without AMX issue
/// `vdpbf16ps` on one port, FMAs on two), bf16 products cannot beat f32 ones.
pub fn bf16_dot_peak(seconds: f64) -> Option<Peak> {
    if !bf16_dot_available() {
        return None;
    }
    let threads = rayon::current_num_threads();
    let iters = calibrate(seconds, bf16_chains);
    let best = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let sum: f32 = (0..threads)
                .into_par_iter()
                .map(|_| bf16_chains(iters))
                .sum();
            std::hint::black_box(sum);
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    // 16 lanes, two multiply-adds (four operations) per lane per instruction.
    let flops = (threads * iters * CHAINS * 16 * 4) as f64;
    Some(Peak {
        gflops: flops / best / 1e9,
        threads,
        isa: "avx512bf16",
    })
}

/// Whether bf16 dot products outrun f32 FMAs on this CPU by at least half, on one thread
/// (about 0.2 s, measured once per process; the two kinds of rounds alternate and the best of
/// each counts, so a busy machine slows both alike): Zen 4 runs `vdpbf16ps` at the FMA rate,
/// so at twice the f32 products' peak; Intel cores without AMX at half the rate, so at the
/// same peak.
pub fn bf16_dots_outrun_fmas() -> bool {
    static FASTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FASTER.get_or_init(|| {
        if !bf16_dot_available() {
            return false;
        }
        let isa = isa();
        let fma = |n: usize| chains(isa, n);
        let (fma_iters, dot_iters) = (calibrate(0.06, fma), calibrate(0.06, bf16_chains));
        let time = |f: &dyn Fn(usize) -> f32, iters: usize| {
            let t0 = Instant::now();
            std::hint::black_box(f(iters));
            t0.elapsed().as_secs_f64()
        };
        let (mut fma_s, mut dot_s) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            fma_s = fma_s.min(time(&fma, fma_iters));
            dot_s = dot_s.min(time(&bf16_chains, dot_iters));
        }
        let fma_rate = fma_iters as f64 * 2.0 * fma_lanes(isa) as f64 / fma_s;
        let dot_rate = dot_iters as f64 * 4.0 * 16.0 / dot_s;
        dot_rate >= 1.5 * fma_rate
    })
}

fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `iters` rounds of `CHAINS` bf16 dot products (only where [`bf16_dot_available`]).
fn bf16_chains(iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_available() {
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked).
        return unsafe { x86::chains_bf16(iters) };
    }
    let _ = iters;
    0.0
}

/// The iteration count that makes one thread's run of `f` last about `seconds / 3`.
fn calibrate(seconds: f64, f: impl Fn(usize) -> f32) -> usize {
    let mut iters = 1usize << 16;
    loop {
        let t0 = Instant::now();
        std::hint::black_box(f(iters));
        let s = t0.elapsed().as_secs_f64();
        if s > 0.02 || iters > 1 << 34 {
            return ((iters as f64) * (seconds / 3.0 / s.max(1e-9))).max(1.0) as usize;
        }
        iters *= 4;
    }
}

fn fma_lanes(isa: &str) -> usize {
    match isa {
        "avx512" => 16,
        "avx2" => 8,
        _ => 1,
    }
}

/// The floating-point operations of one encoder forward of `clips` clips of `tokens` tokens of
/// width `dim` through `depth` blocks with an MLP of width `hidden`: per block the four
/// Linears (qkv 3 D^2, proj D^2, fc1 and fc2 D x hidden, 2 per multiply-add) and attention
/// (scores and weighted sum, 4 N^2 D); LayerNorm, softmax and GELU are not counted.
pub fn encoder_flops(clips: usize, tokens: usize, dim: usize, hidden: usize, depth: usize) -> f64 {
    let (n, d, h) = (tokens as f64, dim as f64, hidden as f64);
    let linears = 2.0 * n * (3.0 * d * d + d * d + 2.0 * d * h);
    let attention = 4.0 * n * n * d;
    clips as f64 * depth as f64 * (linears + attention)
}

fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
    }
    "scalar"
}

/// `iters` rounds of `CHAINS` FMAs in the registers of `isa`; returns a value that depends on
/// every chain (so none is optimised away).
fn chains(isa: &str, iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` says the CPU has the instructions (checked at run time by `isa()`).
        match isa {
            "avx512" => return unsafe { x86::chains_avx512(iters) },
            "avx2" => return unsafe { x86::chains_avx2(iters) },
            _ => {}
        }
    }
    let _ = isa;
    let mut acc = [0f32; CHAINS];
    let (a, b) = (
        std::hint::black_box(0.999_999f32),
        std::hint::black_box(1e-7f32),
    );
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = x.mul_add(a, b);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chains_avx512(iters: usize) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn chains_bf16(iters: usize) -> f32 {
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80)));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3380_3380)));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chains_avx2(iters: usize) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flops_of_a_vit_b_clip_are_the_papers_count() {
        // ViT-B, 1568 tokens: 12 x (24 N D^2 + 4 N^2 D) = 357 GFLOP per clip.
        let f = encoder_flops(1, 1568, 768, 3072, 12);
        let want = 12.0 * (24.0 * 1568.0 * 768f64.powi(2) + 4.0 * 1568f64.powi(2) * 768.0);
        assert!((f - want).abs() < 1.0, "{f} vs {want}");
        assert!((f / 1e9 - 357.0).abs() < 1.0, "{}", f / 1e9);
    }

    #[test]
    fn the_peak_is_positive_and_each_wider_isa_is_not_slower() {
        let p = fma_peak(0.05);
        assert!(p.gflops.is_finite() && p.gflops > 0.0, "{p:?}");
        assert!(p.threads >= 1);
        // One chain round per lane: the widest ISA's peak per thread beats scalar's.
        if p.isa != "scalar" {
            let t0 = Instant::now();
            std::hint::black_box(chains("scalar", 1 << 20));
            let scalar = (CHAINS << 21) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            assert!(
                p.gflops / p.threads as f64 > scalar,
                "{p:?} vs scalar {scalar}"
            );
        }
    }

    #[test]
    fn the_bf16_dot_peak_is_positive_where_the_cpu_has_the_instructions() {
        match bf16_dot_peak(0.05) {
            Some(d) => {
                assert!(d.gflops.is_finite() && d.gflops > 0.0, "{d:?}");
                assert_eq!(d.isa, "avx512bf16");
                // Four operations per lane per instruction: at least the scalar FMA rate.
                let f = fma_peak(0.05);
                assert!(d.gflops > f.gflops / 4.0, "{d:?} vs {f:?}");
            }
            None => assert!(!bf16_dots_outrun_fmas(), "no instructions, yet faster?"),
        }
    }
}
