//! f32 matrix products from packed 16-column panels in AVX-512, for the CPU attention
//! ([`super::cpu::attention`]).
//!
//! The right operand `W[k, n]` is packed once per head as `[n/16][k][16]` (zero-padded
//! columns), so one 64-byte load is 16 columns of one row; the left operand is read in place
//! from strided rows. The register tile is 6 rows by 64 columns: 24 accumulators, and per step
//! of k 4 panel loads and 6 broadcasts for 24 FMAs, which keeps both FMA ports of a core busy
//! while the loads stay under the two per cycle every AVX-512 core can issue.
//!
//! `gemm`, which the Linears use, packs both operands at every call and is tuned for large k;
//! attention's products are two thin ones per head (`k` = 64 for the scores, `n` = 64 for
//! the output) repeated for every block of query rows, where that packing and the
//! accumulators' loads and stores weigh (48% of the FMA peak on the 2-core Zen 5 against
//! 80% for fc2).

/// Columns per panel: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// Whether this CPU runs the kernels (AVX-512F). `MARLIN_NO_AVX512_ATTENTION` in the
/// environment says no, to time or test the portable path on a machine that has them.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("MARLIN_NO_AVX512_ATTENTION").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Floats of the panels of a `[k, n]` right operand.
pub fn packed_len(k: usize, n: usize) -> usize {
    n.div_ceil(LANES) * k * LANES
}

/// `W[k, n]` whose rows are `stride` apart in `w` into `out` `[n/16][k][16]` (columns past
/// `n` zero; every element of `out[..packed_len(k, n)]` is written).
pub fn pack(w: &[f32], k: usize, n: usize, stride: usize, out: &mut [f32]) {
    assert!(out.len() >= packed_len(k, n) && (k == 0 || w.len() >= (k - 1) * stride + n));
    for jb in 0..n.div_ceil(LANES) {
        let (col, cols) = (jb * LANES, (n - jb * LANES).min(LANES));
        let panel = &mut out[jb * k * LANES..(jb + 1) * k * LANES];
        for (p, dst) in panel.chunks_exact_mut(LANES).enumerate() {
            dst[..cols].copy_from_slice(&w[p * stride + col..p * stride + col + cols]);
            dst[cols..].fill(0.0);
        }
    }
}

/// The transpose of `rows` rows of `k` values (`stride` apart in `x`) into `out`: the right
/// operand `W[k, rows]` with `W[p, j] = x[j * stride + p]` (Kᵀ for attention's scores),
/// `[rows/16][k][16]`, every element of `out[..packed_len(k, rows)]` written.
pub fn pack_transpose(x: &[f32], rows: usize, k: usize, stride: usize, out: &mut [f32]) {
    assert!(out.len() >= packed_len(k, rows) && (rows == 0 || x.len() >= (rows - 1) * stride + k));
    for jb in 0..rows.div_ceil(LANES) {
        let panel = &mut out[jb * k * LANES..(jb + 1) * k * LANES];
        let cols = (rows - jb * LANES).min(LANES);
        if cols < LANES {
            panel.fill(0.0);
        }
        for jj in 0..cols {
            let src = &x[(jb * LANES + jj) * stride..(jb * LANES + jj) * stride + k];
            for (p, &v) in src.iter().enumerate() {
                panel[p * LANES + jj] = v;
            }
        }
    }
}

/// `c[i, j] <- mul[i] * ((acc ? c[i, j] : 0) + Σ_p a[i, p] W[p, j])` for `i < rows`,
/// `j < n`, `p < k`: `a`'s rows `a_rs` apart (columns contiguous), `c`'s rows `c_rs` apart,
/// `W` packed as [`pack`] writes it with `ps` floats from one panel to the next (`bp` may
/// point at row `p0` of the first panel, so a caller can take the rows of `W` in chunks). On
/// this thread; 64-column blocks of `W` outside, 6-row tiles inside, so a block of panels is
/// read from the core's L1 by every tile of rows.
///
/// # Safety
/// [`available`] is true; `mul` holds `rows` values; `a` addresses `rows` rows of `k` values,
/// `bp` `n/16` (rounded up) panels of `k` rows, `c` `rows` rows of `n` values, with the
/// strides given, and `c` overlaps neither.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    bp: *const f32,
    ps: usize,
    [rows, k, n]: [usize; 3],
    mul: &[f32],
    acc: bool,
) {
    debug_assert!(mul.len() >= rows);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller guarantees.
    unsafe {
        avx512::product(c, c_rs, a, a_rs, bp, ps, [rows, k, n], mul, acc)
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (c, c_rs, a, a_rs, bp, ps, rows, k, n, mul, acc);
        unreachable!("panels::available() is false off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Rows of the register tile.
    const MR: usize = 6;
    /// Panels (of 16 columns) of the register tile.
    const NR: usize = 4;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        c: *mut f32,
        c_rs: usize,
        a: *const f32,
        a_rs: usize,
        bp: *const f32,
        ps: usize,
        [rows, k, n]: [usize; 3],
        mul: &[f32],
        acc: bool,
    ) {
        let nb = n.div_ceil(LANES);
        let mut jb = 0;
        while jb < nb {
            let panels = (nb - jb).min(NR);
            // Columns of the last panel of this block (1 to 16).
            let last = (n - (jb + panels - 1) * LANES).min(LANES);
            let mask: __mmask16 = if last == LANES {
                0xffff
            } else {
                ((1u32 << last) - 1) as u16
            };
            let b = bp.add(jb * ps);
            let cj = c.add(jb * LANES);
            let mut r = 0;
            while r < rows {
                let mr = (rows - r).min(MR);
                let t = Tile {
                    c: cj.add(r * c_rs),
                    c_rs,
                    a: a.add(r * a_rs),
                    a_rs,
                    b,
                    ps,
                    k,
                    mul: mul.as_ptr().add(r),
                    mask,
                    acc,
                };
                match (mr, panels) {
                    (6, 4) => t.run::<6, 4>(),
                    (6, 3) => t.run::<6, 3>(),
                    (6, 2) => t.run::<6, 2>(),
                    (6, 1) => t.run::<6, 1>(),
                    (5, 4) => t.run::<5, 4>(),
                    (5, 3) => t.run::<5, 3>(),
                    (5, 2) => t.run::<5, 2>(),
                    (5, 1) => t.run::<5, 1>(),
                    (4, 4) => t.run::<4, 4>(),
                    (4, 3) => t.run::<4, 3>(),
                    (4, 2) => t.run::<4, 2>(),
                    (4, 1) => t.run::<4, 1>(),
                    (3, 4) => t.run::<3, 4>(),
                    (3, 3) => t.run::<3, 3>(),
                    (3, 2) => t.run::<3, 2>(),
                    (3, 1) => t.run::<3, 1>(),
                    (2, 4) => t.run::<2, 4>(),
                    (2, 3) => t.run::<2, 3>(),
                    (2, 2) => t.run::<2, 2>(),
                    (2, 1) => t.run::<2, 1>(),
                    (1, 4) => t.run::<1, 4>(),
                    (1, 3) => t.run::<1, 3>(),
                    (1, 2) => t.run::<1, 2>(),
                    _ => t.run::<1, 1>(),
                }
                r += mr;
            }
            jb += panels;
        }
    }

    /// One register tile's operands.
    struct Tile {
        c: *mut f32,
        c_rs: usize,
        a: *const f32,
        a_rs: usize,
        b: *const f32,
        ps: usize,
        k: usize,
        mul: *const f32,
        /// Columns written of the tile's last panel.
        mask: __mmask16,
        acc: bool,
    }

    impl Tile {
        /// `R` rows by `P` panels; the last panel's stores masked.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize, const P: usize>(&self) {
            let mut s = [[_mm512_setzero_ps(); P]; R];
            for p in 0..self.k {
                let mut w = [_mm512_setzero_ps(); P];
                for (j, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_ps(self.b.add(j * self.ps + p * LANES));
                }
                for (i, row) in s.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*self.a.add(i * self.a_rs + p));
                    for (acc, &w) in row.iter_mut().zip(&w) {
                        *acc = _mm512_fmadd_ps(x, w, *acc);
                    }
                }
            }
            for (i, row) in s.iter().enumerate() {
                let m = _mm512_set1_ps(*self.mul.add(i));
                let dst = self.c.add(i * self.c_rs);
                for (j, &v) in row.iter().enumerate() {
                    let mask = if j + 1 == P { self.mask } else { 0xffff };
                    let d = dst.add(j * LANES);
                    let v = if self.acc {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, d))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(d, mask, _mm512_mul_ps(v, m));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive f64 product, on shapes with every edge (rows not a multiple of 6,
    /// columns not a multiple of 16 or 64, a chunk of W's rows taken from the middle), with
    /// and without accumulation.
    #[test]
    fn product_matches_a_naive_product() {
        if !available() {
            return;
        }
        for &[m, k, n, p0] in &[
            [1, 1, 1, 0],
            [7, 5, 17, 0],
            [13, 64, 100, 3],
            [6, 33, 64, 0],
            [25, 70, 130, 10],
        ] {
            let kk = k + p0;
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..kk * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mul: Vec<f32> = (0..m).map(|i| 0.5 + i as f32 * 0.25).collect();
            let mut bp = vec![f32::NAN; packed_len(kk, n)];
            pack(&w, kk, n, n, &mut bp);
            let base: Vec<f32> = (0..m * (n + 3)).map(|i| (i % 7) as f32).collect();
            for acc in [false, true] {
                let mut c = base.clone();
                // SAFETY: the buffers hold the shapes described (c's rows n + 3 apart).
                unsafe {
                    product(
                        c.as_mut_ptr(),
                        n + 3,
                        a.as_ptr(),
                        k,
                        bp.as_ptr().add(p0 * LANES),
                        kk * LANES,
                        [m, k, n],
                        &mul,
                        acc,
                    )
                };
                for i in 0..m {
                    for j in 0..n + 3 {
                        let got = c[i * (n + 3) + j];
                        if j >= n {
                            assert_eq!(got, base[i * (n + 3) + j], "wrote past n at {i},{j}");
                            continue;
                        }
                        let s: f64 = (0..k)
                            .map(|p| a[i * k + p] as f64 * w[(p0 + p) * n + j] as f64)
                            .sum();
                        let prev = if acc {
                            base[i * (n + 3) + j] as f64
                        } else {
                            0.0
                        };
                        let want = mul[i] as f64 * (prev + s);
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "[{m},{k},{n}] acc {acc} at {i},{j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pack_transpose_is_the_transpose() {
        let (rows, k, stride) = (37, 9, 12);
        let x: Vec<f32> = (0..rows * stride).map(|i| i as f32).collect();
        let mut t = vec![f32::NAN; packed_len(k, rows)];
        pack_transpose(&x, rows, k, stride, &mut t);
        let mut want = vec![0f32; k * rows];
        for j in 0..rows {
            for p in 0..k {
                want[p * rows + j] = x[j * stride + p];
            }
        }
        let mut packed = vec![f32::NAN; packed_len(k, rows)];
        pack(&want, k, rows, rows, &mut packed);
        assert_eq!(t, packed);
    }
}
