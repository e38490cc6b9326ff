//! Host kernels of the training engine's ops (`engine::host_train`): LayerNorm with its saved
//! statistics and its backward, column sums (bias gradients), LeakyReLU, the MSE loss with its
//! gradient, and a fused AdamW. Reductions over rows are in f64, in fixed row chunks, so a
//! result does not depend on the number of threads.

use rayon::prelude::*;

/// Rows per task of the row reductions (fixed: the sums' order does not depend on threads).
const CHUNK_ROWS: usize = 256;

/// `out = LN(x)` row by row (`d` values per row, biased variance as torch), writing each
/// row's mean and 1/σ into `stats` `[rows, 2]` for [`layer_norm_backward`].
pub fn layer_norm_stats(
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    d: usize,
    out: &mut [f32],
    stats: &mut [f32],
) {
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(stats.par_chunks_mut(2))
        .for_each(|((o, r), st)| {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for (((o, &v), &g), &b) in o.iter_mut().zip(r).zip(gamma).zip(beta) {
                *o = ((v as f64 - mean) * rstd) as f32 * g + b;
            }
            st[0] = mean as f32;
            st[1] = rstd as f32;
        });
}

/// Gradients of [`layer_norm_stats`] from `dout`: `dx += rstd·(dx̂ - mean(dx̂) - x̂·mean(dx̂⊙x̂))`
/// with `dx̂ = dout⊙γ`, `dgamma += Σ dout⊙x̂`, `dbeta += Σ dout` over the rows.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dout: &[f32],
    d: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(d * CHUNK_ROWS)
        .zip(x.par_chunks(d * CHUNK_ROWS))
        .zip(dout.par_chunks(d * CHUNK_ROWS))
        .zip(stats.par_chunks(2 * CHUNK_ROWS))
        .map(|(((dx, x), dy), st)| {
            let (mut dg, mut db) = (vec![0f64; d], vec![0f64; d]);
            let mut xhat = vec![0f32; d];
            for (((dx, x), dy), st) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(dy.chunks_exact(d))
                .zip(st.chunks_exact(2))
            {
                let (mean, rstd) = (st[0], st[1]);
                let (mut s1, mut s2) = (0f64, 0f64);
                for i in 0..d {
                    xhat[i] = (x[i] - mean) * rstd;
                    let g = (dy[i] * gamma[i]) as f64;
                    s1 += g;
                    s2 += g * xhat[i] as f64;
                    dg[i] += (dy[i] * xhat[i]) as f64;
                    db[i] += dy[i] as f64;
                }
                let (m1, m2) = ((s1 / d as f64) as f32, (s2 / d as f64) as f32);
                for i in 0..d {
                    dx[i] += rstd * (dy[i] * gamma[i] - m1 - xhat[i] * m2);
                }
            }
            (dg, db)
        })
        .collect();
    for (dg, db) in partial {
        dgamma
            .iter_mut()
            .zip(&dg)
            .for_each(|(o, v)| *o += *v as f32);
        dbeta.iter_mut().zip(&db).for_each(|(o, v)| *o += *v as f32);
    }
}

/// `dst[c] += Σ_r src[r, col0 + c]` over `src`'s rows of `width` values (a bias's gradient;
/// `dst.len()` columns from `col0`).
pub fn col_sum(src: &[f32], width: usize, col0: usize, dst: &mut [f32]) {
    let cols = dst.len();
    let partial: Vec<Vec<f64>> = src
        .par_chunks(width * CHUNK_ROWS)
        .map(|rows| {
            let mut s = vec![0f64; cols];
            for r in rows.chunks_exact(width) {
                s.iter_mut()
                    .zip(&r[col0..col0 + cols])
                    .for_each(|(s, &v)| *s += v as f64);
            }
            s
        })
        .collect();
    let mut total = vec![0f64; cols];
    for p in partial {
        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
    }
    dst.iter_mut()
        .zip(&total)
        .for_each(|(o, v)| *o += *v as f32);
}

/// `out = LeakyReLU(x)` with `slope` below 0.
pub fn leaky_relu(x: &[f32], slope: f32, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(o, &v)| *o = if v > 0.0 { v } else { v * slope });
}

/// `grad *= LeakyReLU'(x)`: 1 above 0, `slope` at or below (torch's choice at 0).
pub fn leaky_relu_backward(x: &[f32], slope: f32, grad: &mut [f32]) {
    grad.par_iter_mut().zip(x.par_iter()).for_each(|(g, &v)| {
        if v <= 0.0 {
            *g *= slope
        }
    });
}

/// mean((pred - target)²) in f64; with `dpred`, also its gradient `2·(pred - target)/len`.
pub fn mse(pred: &[f32], target: &[f32], dpred: Option<&mut [f32]>) -> f64 {
    let n = pred.len().max(1) as f64;
    if let Some(dp) = dpred {
        let s = (2.0 / n) as f32;
        dp.par_iter_mut()
            .zip(pred.par_iter().zip(target.par_iter()))
            .for_each(|(g, (&p, &t))| *g = s * (p - t));
    }
    let sum: f64 = pred
        .par_chunks(1 << 14)
        .zip(target.par_chunks(1 << 14))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(&p, &t)| ((p - t) as f64).powi(2))
                .sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .into_iter()
        .sum();
    sum / n
}

/// The mean of `x` in f64 (chunk sums in a fixed order).
pub fn mean(x: &[f32]) -> f64 {
    let sum: f64 = x
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|&v| v as f64).sum::<f64>())
        .collect::<Vec<f64>>()
        .into_iter()
        .sum();
    sum / x.len().max(1) as f64
}

/// AdamW's settings for one update (`step` counts from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u32,
}

/// One AdamW update of `p` from `g`, moments `m`, `v` (zero before the first step), as torch
/// and burn: `m = β₁m + (1-β₁)g`, `v = β₂v + (1-β₂)g²`,
/// `p = p·(1 - lr·wd) - lr·m̂/(√v̂ + ε)` with `m̂ = m/(1-β₁ᵗ)`, `v̂ = v/(1-β₂ᵗ)`.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamW) {
    let c1 = 1.0 - h.beta1.powi(h.step as i32);
    let c2 = 1.0 - h.beta2.powi(h.step as i32);
    let decay = 1.0 - h.lr * h.weight_decay;
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            *m = h.beta1 * *m + (1.0 - h.beta1) * g;
            *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
            let (mh, vh) = (*m / c1, *v / c2);
            *p = *p * decay - h.lr * mh / (vh.sqrt() + h.eps);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LayerNorm's backward against central differences of Σ w ⊙ LN(x).
    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let (rows, d) = (3, 7);
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 37) % 11) as f32 / 3.0 - 1.5)
            .collect();
        let g: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 10.0).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 / 20.0 - 0.1).collect();
        let w: Vec<f32> = (0..rows * d).map(|i| ((i * 13) % 5) as f32 - 2.0).collect();
        let f = |x: &[f32], g: &[f32], b: &[f32]| -> f64 {
            let mut out = vec![0f32; rows * d];
            let mut st = vec![0f32; rows * 2];
            layer_norm_stats(x, (g, b), 1e-6, d, &mut out, &mut st);
            out.iter().zip(&w).map(|(o, w)| (o * w) as f64).sum()
        };
        let mut out = vec![0f32; rows * d];
        let mut st = vec![0f32; rows * 2];
        layer_norm_stats(&x, (&g, &b), 1e-6, d, &mut out, &mut st);
        let (mut dx, mut dg, mut db) = (vec![0f32; rows * d], vec![0f32; d], vec![0f32; d]);
        layer_norm_backward(&x, &st, &g, &w, d, &mut dx, &mut dg, &mut db);
        let h = 1e-3;
        let num = |v: &[f32], i: usize, which: u8| {
            let (mut p, mut m) = (v.to_vec(), v.to_vec());
            p[i] += h;
            m[i] -= h;
            let (fp, fm) = match which {
                0 => (f(&p, &g, &b), f(&m, &g, &b)),
                1 => (f(&x, &p, &b), f(&x, &m, &b)),
                _ => (f(&x, &g, &p), f(&x, &g, &m)),
            };
            ((fp - fm) / (2.0 * h as f64)) as f32
        };
        for (i, &got) in dx.iter().enumerate() {
            let n = num(&x, i, 0);
            assert!((n - got).abs() < 2e-2, "dx[{i}]: {got} vs {n}");
        }
        for i in 0..d {
            let (ng, nb) = (num(&g, i, 1), num(&b, i, 2));
            assert!((ng - dg[i]).abs() < 2e-2, "dgamma[{i}]: {} vs {ng}", dg[i]);
            assert!((nb - db[i]).abs() < 2e-2, "dbeta[{i}]: {} vs {nb}", db[i]);
        }
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient() {
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = [0.3f32, -0.1, 0.0];
        let (mut m, mut v) = (vec![0f32; 3], vec![0f32; 3]);
        let h = AdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
        };
        adamw(&mut p, &g, &mut m, &mut v, &h);
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?} vs {want:?}");
        }
    }

    #[test]
    fn col_sum_adds_each_column_of_the_range() {
        let src: Vec<f32> = (0..3 * 4).map(|i| i as f32).collect();
        let mut dst = vec![1.0f32; 2];
        col_sum(&src, 4, 1, &mut dst);
        assert_eq!(dst, vec![1.0 + 1.0 + 5.0 + 9.0, 1.0 + 2.0 + 6.0 + 10.0]);
    }
}
