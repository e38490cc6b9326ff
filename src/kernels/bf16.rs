//! bf16 matrix products with f32 accumulation for `--precision bf16` on the CPU: both operands
//! rounded to bfloat16 (round to nearest even), products summed in f32 by AVX-512 BF16's
//! `vdpbf16ps` (two products per f32 lane per instruction, twice the f32 FMA rate).
//!
//! `dst[m, n] (+)= bf16(a)[m, k] · bf16(w)[k, n]`. `a` is converted to pairs of consecutive
//! k (`[m, k/2]` u32), `w` packed into 16-column panels of k pairs (`[n/16][k/2][16]` u32), so
//! the micro-kernel (8 rows x 32 columns, 16 accumulators) broadcasts one pair of `a` and
//! multiplies two 16-lane panel rows. A model's weights are packed once and kept while their
//! storage lives ([`cached_panels`]); other right operands are packed per call.

use rayon::prelude::*;

/// Whether the CPU has AMX tiles for bf16 products (and this process may use them).
/// `MARLIN_NO_AMX` in the environment says no.
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows of `a` per parallel task.
const ROW_BLOCK: usize = 128;

/// Panels of `w` per parallel task when packing (128 columns: 512-byte runs of each row).
const PANELS_PER_TASK: usize = 48;

/// Whether this CPU has the instructions (AVX-512F and AVX-512 BF16). `MARLIN_NO_BF16` in the
/// environment says no, to try the fallback on a machine that has them.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("MARLIN_NO_BF16").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32.
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `w` `[k, n]` into 16-column panels, `[nb][kp][16]` pairs (columns past n are zero), one
/// panel per task, into `out` (resized; every element is written).
fn pack_panels_into(w: &[f32], k: usize, n: usize, out: &mut Vec<u32>) {
    let (kp, nb) = (k.div_ceil(2), n.div_ceil(16));
    out.resize(nb * kp * 16, 0);
    out.par_chunks_mut(PANELS_PER_TASK * kp * 16)
        .enumerate()
        .for_each(|(t, panels)| fill_panels(panels, w, t * PANELS_PER_TASK, k, n, n));
}

/// Rows of `a` per parallel task of [`matmul`]: about [`ROW_BLOCK`], as many tasks for every
/// thread so that the threads finish together (1568 rows on 2 threads: 14 tasks of 112, not
/// 12 of 128 and one of 32), in multiples of the micro-kernel's 8 rows (32 for AMX tiles).
fn rows_per_task(m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = m.div_ceil(ROW_BLOCK * threads).max(1) * threads;
    let unit = if amx_available() { 32 } else { 8 };
    m.div_ceil(tasks).div_ceil(unit).max(1) * unit
}

thread_local! {
    /// Each thread's pairs of its rows of `a` in [`matmul`] (reused: no allocation, no page
    /// faults per call).
    static ROW_PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's packed panels of `w` in [`matmul`] (reused likewise).
    static PANELS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Consecutive panels from `jb0` (`panels` holds a whole number of `[kp][16]` panels) of
/// `w[k, n]` whose rows are `stride` apart, walking the rows of `w` once: each row pair is
/// read as one run of `16 x panels` columns (a panel at a time down the column read 64 bytes
/// per row, a stride the prefetchers follow badly: 2.5x slower for ViT-B's weights).
fn fill_panels(panels: &mut [u32], w: &[f32], jb0: usize, k: usize, n: usize, stride: usize) {
    let kp = k.div_ceil(2);
    let count = panels.len() / (kp * 16).max(1);
    let fast = supported();
    for p in 0..kp {
        let (r0, r1) = (2 * p * stride, (2 * p + 1) * stride);
        for g in 0..count {
            let (jb, col) = (jb0 + g, (jb0 + g) * 16);
            let dst = &mut panels[(g * kp + p) * 16..(g * kp + p) * 16 + 16];
            if fast && col + 16 <= n && 2 * p + 1 < k {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F and AVX-512 BF16 are present (checked); both rows hold 16
                // columns from `col` (a full panel) and `dst` 16 pairs.
                unsafe {
                    avx512::interleave(
                        &w[r0 + col..r0 + col + 16],
                        &w[r1 + col..r1 + col + 16],
                        dst,
                    )
                };
                continue;
            }
            for (j, d) in dst.iter_mut().enumerate() {
                if jb * 16 + j >= n {
                    *d = 0;
                    continue;
                }
                let lo = to_bf16(w[r0 + col + j]) as u32;
                let hi = if 2 * p + 1 < k {
                    to_bf16(w[r1 + col + j]) as u32
                } else {
                    0
                };
                *d = lo | (hi << 16);
            }
        }
    }
}

/// `dst[m, n] (+)= bf16(a)[m, k] · bf16(w)[k, n]`, row-major, on the rayon pool. Falls back to
/// a portable loop (same rounding, same f32 sums in another order) where the CPU lacks
/// AVX-512 BF16. `w` is packed once per call (into a reused buffer); [`matmul_panels`] takes
/// it packed.
pub fn matmul(dst: &mut [f32], a: &[f32], w: &[f32], [m, k, n]: [usize; 3], acc: bool) {
    assert!(dst.len() == m * n && a.len() == m * k && w.len() == k * n);
    let mut bp = PANELS.with(|b| std::mem::take(&mut *b.borrow_mut()));
    pack_panels_into(w, k, n, &mut bp);
    matmul_panels(dst, a, &bp, [m, k, n], acc);
    PANELS.with(|b| *b.borrow_mut() = bp);
}

/// [`matmul`] with `w` already packed ([`panels`] or [`cached_panels`]). Each task rounds its
/// own rows of `a` just before its product, so they are still in its core's cache.
pub fn matmul_panels(dst: &mut [f32], a: &[f32], bp: &[u32], [m, k, n]: [usize; 3], acc: bool) {
    let kp = k.div_ceil(2);
    assert!(dst.len() == m * n && a.len() == m * k && bp.len() == n.div_ceil(16) * kp * 16);
    if m == 0 || n == 0 {
        return;
    }
    let rows = rows_per_task(m);
    dst.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k.max(1)))
        .for_each(|(c, a)| {
            let r = c.len() / n;
            ROW_PAIRS.with(|buf| {
                let mut ap = buf.borrow_mut();
                ap.resize(r * kp, 0);
                pairs_into(a, r, k, k, 1.0, &mut ap[..r * kp]);
                product(c, &ap, bp, r, kp, n, acc);
            });
        });
}

/// `w` `[k, n]` packed for [`matmul_panels`] (`[n/16][k/2][16]` pairs).
pub fn panels(w: &[f32], k: usize, n: usize) -> Vec<u32> {
    assert_eq!(w.len(), k * n, "weight is not [k, n]");
    let mut out = Vec::new();
    pack_panels_into(w, k, n, &mut out);
    out
}

/// The storage a weight's values live in, shared and copy-on-write (a burn-flex tensor's
/// `Arc<Bytes>`).
pub type Owner = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// Packed panels kept, in all, up to this many bytes (a ViT-L encoder's are 0.6 GB).
const CACHE_BYTES: usize = 2 << 30;

struct Cached {
    owner: std::sync::Weak<dyn std::any::Any + Send + Sync>,
    at: usize,
    kn: [usize; 2],
    panels: std::sync::Arc<Vec<u32>>,
}

static CACHE: std::sync::Mutex<Vec<Cached>> = std::sync::Mutex::new(Vec::new());

/// [`panels`] of `w` `[k, n]`, whose values lie in `owner`, packed on the first call and kept
/// while `owner` lives, so a model's weights are packed on its first pass only (repacking
/// cost ViT-B 3-4% of a bf16 forward).
///
/// An entry can never be stale. It is found by the address of `owner`'s allocation and of
/// `w` in it, and holds a `Weak` to it: the allocation cannot be freed and reused while the
/// `Weak` lives, and copy-on-write storage is never changed in place while one exists
/// (`Arc::get_mut` refuses, `Arc::make_mut` moves the values to a new allocation first), so
/// new values mean a new owner and a new entry. Entries whose owner is gone are dropped on
/// the next insertion, then the oldest beyond [`CACHE_BYTES`].
pub fn cached_panels(owner: &Owner, w: &[f32], k: usize, n: usize) -> std::sync::Arc<Vec<u32>> {
    let same = |c: &Cached| {
        std::ptr::addr_eq(c.owner.as_ptr(), std::sync::Arc::as_ptr(owner))
            && c.at == w.as_ptr() as usize
            && c.kn == [k, n]
    };
    // A poisoned lock only means another thread panicked while holding it; the list itself
    // is always consistent (pushes and retains).
    let lock = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = lock().iter().find(|c| same(c)) {
        return c.panels.clone();
    }
    let packed = std::sync::Arc::new(panels(w, k, n));
    let mut cache = lock();
    if let Some(c) = cache.iter().find(|c| same(c)) {
        return c.panels.clone();
    }
    cache.retain(|c| c.owner.strong_count() > 0);
    cache.push(Cached {
        owner: std::sync::Arc::downgrade(owner),
        at: w.as_ptr() as usize,
        kn: [k, n],
        panels: packed.clone(),
    });
    let mut total: usize = cache.iter().map(|c| c.panels.len() * 4).sum();
    while total > CACHE_BYTES && cache.len() > 1 {
        total -= cache.remove(0).panels.len() * 4;
    }
    packed
}

/// `c[rows, n] (+)= a[rows, kp pairs] · panels[n/16][kp][16]`, on this thread: AMX tiles for
/// the rows they fit (rows in 32s, kp in 16s, n in 32s), AVX-512 BF16 for the rest, the
/// portable loop without either.
pub fn product(c: &mut [f32], a: &[u32], bp: &[u32], rows: usize, kp: usize, n: usize, acc: bool) {
    assert!(c.len() >= rows * n && a.len() >= rows * kp && bp.len() >= n.div_ceil(16) * kp * 16);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if amx::available() && kp.is_multiple_of(16) && n.is_multiple_of(32) {
        done = rows / 32 * 32;
        if done > 0 {
            // SAFETY: AMX is enabled for this process (checked); the first `done` rows, kp
            // and n are multiples of the tile sizes and the slices hold them (asserted).
            unsafe { amx::block(c, a, bp, done, kp, n, acc) };
        }
    }
    if done == rows {
        return;
    }
    let (c, a, rows) = (&mut c[done * n..], &a[done * kp..], rows - done);
    if supported() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked); the slices hold `rows` rows
        // of the sizes the kernel reads and writes (asserted above).
        unsafe {
            avx512::block(c, a, bp, rows, kp, n, acc)
        };
    } else {
        portable_block(c, a, bp, rows, kp, n, acc);
    }
}

/// Pairs of consecutive elements of `rows` rows of `k` values, `stride` apart in `x`, each
/// multiplied by `scale` before rounding (`[rows, k/2]`, the last pair zero-padded).
pub fn pairs_of_rows(x: &[f32], rows: usize, k: usize, stride: usize, scale: f32) -> Vec<u32> {
    let mut out = vec![0u32; rows * k.div_ceil(2)];
    pairs_into(x, rows, k, stride, scale, &mut out);
    out
}

/// [`pairs_of_rows`] into `out` (`rows * k/2` pairs, every one written).
pub fn pairs_into(x: &[f32], rows: usize, k: usize, stride: usize, scale: f32, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    assert!(out.len() >= rows * kp && (rows == 0 || x.len() >= (rows - 1) * stride + k));
    let fast = supported();
    for (r, o) in out.chunks_mut(kp).take(rows).enumerate() {
        let row = &x[r * stride..r * stride + k];
        let mut p0 = 0;
        if fast {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F and AVX-512 BF16 are present (checked); the kernel reads whole
            // 32-value chunks of `row` and writes the matching 16 pairs of `o`.
            unsafe {
                p0 = avx512::pairs(row, o, scale)
            };
        }
        for p in p0..kp {
            let lo = to_bf16(row[2 * p] * scale) as u32;
            let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v * scale) as u32);
            o[p] = lo | (hi << 16);
        }
    }
}

/// Panels of the transpose of `rows` rows of `k` values (`stride` apart): the right operand
/// `W[k, rows]` with `W[p, j] = x[j, p]`, e.g. Kᵀ for attention scores.
pub fn panels_of_transpose(x: &[f32], rows: usize, k: usize, stride: usize) -> Vec<u32> {
    let (kp, nb) = (k.div_ceil(2), rows.div_ceil(16));
    let mut out = vec![0u32; nb * kp * 16];
    let mut pairs = vec![0u32; kp];
    for j in 0..rows {
        pairs_into(&x[j * stride..], 1, k, stride, 1.0, &mut pairs);
        let (jb, jj) = (j / 16, j % 16);
        let panel = &mut out[jb * kp * 16..(jb + 1) * kp * 16];
        for (p, &v) in pairs.iter().enumerate() {
            panel[p * 16 + jj] = v;
        }
    }
    out
}

/// A raw pointer to packed pairs that may cross threads; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedPairs(*mut u32);
// SAFETY: only used by [`kv_panels`], whose tasks write disjoint ranges of one buffer.
unsafe impl Send for SharedPairs {}
unsafe impl Sync for SharedPairs {}

impl SharedPairs {
    /// `len` pairs from `off`.
    ///
    /// # Safety
    /// The range lies in the buffer and no other live slice overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, off: usize, len: usize) -> &mut [u32] {
        // SAFETY: as the caller guarantees.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

/// K and V of every (batch item, head) of a fused projection `qkv` `[b, n, 3, h, hd]` as the
/// right operands of attention's two products: `Kᵀ` as [`panels_of_transpose`] writes it
/// (`[b*h][n/16][hd/2][16]`) and `V` as [`panels_strided`] (`[b*h][hd/16][n/2][16]`), in one
/// parallel pass over groups of 16 tokens. Each token's K and V of all heads are one
/// contiguous read; head by head they are 256-byte pieces 9 KB apart, which the prefetchers
/// follow badly (the per-head packing was 7% of a ViT-B attention).
pub fn kv_panels(qkv: &[f32], b: usize, n: usize, h: usize, hd: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut kt, mut vp) = (Vec::new(), Vec::new());
    kv_panels_into(qkv, [b, n, h, hd], &mut kt, &mut vp);
    (kt, vp)
}

/// [`kv_panels`] into `kt` and `vp`, resized, every element written (the zero padding too),
/// so a caller can reuse them from one call to the next.
pub fn kv_panels_into(
    qkv: &[f32],
    [b, n, h, hd]: [usize; 4],
    kt: &mut Vec<u32>,
    vp: &mut Vec<u32>,
) {
    let d = h * hd;
    assert_eq!(
        qkv.len(),
        b * n * 3 * d,
        "qkv buffer does not match [B, N, 3, H, hd]"
    );
    let (kq, kn, nb, nbv) = (
        hd.div_ceil(2),
        n.div_ceil(2),
        n.div_ceil(16),
        hd.div_ceil(16),
    );
    let (k_len, v_len) = (nb * kq * 16, nbv * kn * 16);
    kt.resize(b * h * k_len, 0);
    vp.resize(b * h * v_len, 0);
    let (ks, vs) = (SharedPairs(kt.as_mut_ptr()), SharedPairs(vp.as_mut_ptr()));
    let fast = supported();
    (0..b * nb).into_par_iter().for_each(|task| {
        let (bi, jb) = (task / nb, task % nb);
        let row = |j: usize| &qkv[(bi * n + j) * 3 * d..(bi * n + j + 1) * 3 * d];
        let mut pairs = vec![0u32; kq];
        for hh in 0..h {
            // SAFETY: panel jb of head hh's Kᵀ is this task's alone (one task per jb).
            let panel = unsafe { ks.range((bi * h + hh) * k_len + jb * kq * 16, kq * 16) };
            for j in jb * 16..(jb * 16 + 16).min(n) {
                pairs_into(&row(j)[d + hh * hd..], 1, hd, hd, 1.0, &mut pairs);
                for (p, &v) in pairs.iter().enumerate() {
                    panel[p * 16 + j % 16] = v;
                }
            }
            // Tokens past n in the last panel.
            for j in n.max(jb * 16)..jb * 16 + 16 {
                for p in 0..kq {
                    panel[p * 16 + j % 16] = 0;
                }
            }
        }
        // The pairs of V rows (2p, 2p + 1) of these 16 tokens.
        let (p0, p1) = (jb * 8, (jb * 8 + 8).min(kn));
        for hh in 0..h {
            for c in 0..nbv {
                // SAFETY: pairs p0..p1 of every V panel are this task's alone.
                let dst =
                    unsafe { vs.range((bi * h + hh) * v_len + (c * kn + p0) * 16, (p1 - p0) * 16) };
                let col = 2 * d + hh * hd + c * 16;
                let cols = (hd - c * 16).min(16);
                for (i, p) in (p0..p1).enumerate() {
                    let r0 = &row(2 * p)[col..col + cols];
                    let out = &mut dst[i * 16..i * 16 + 16];
                    out[cols..].fill(0);
                    if 2 * p + 1 < n {
                        let r1 = &row(2 * p + 1)[col..col + cols];
                        if fast && cols == 16 {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: AVX-512F and AVX-512 BF16 are present (checked); both
                            // rows and `out` hold 16 values.
                            unsafe {
                                avx512::interleave(r0, r1, out)
                            };
                            continue;
                        }
                        for j in 0..cols {
                            out[j] = to_bf16(r0[j]) as u32 | ((to_bf16(r1[j]) as u32) << 16);
                        }
                    } else {
                        for j in 0..cols {
                            out[j] = to_bf16(r0[j]) as u32;
                        }
                    }
                }
            }
        }
    });
}

/// Panels of `w[k, n]` whose rows are `stride` apart (e.g. V for attention outputs).
pub fn panels_strided(w: &[f32], k: usize, n: usize, stride: usize) -> Vec<u32> {
    let (kp, nb) = (k.div_ceil(2), n.div_ceil(16));
    let mut out = vec![0u32; nb * kp * 16];
    fill_panels(&mut out, w, 0, k, n, stride);
    out
}

fn portable_block(
    c: &mut [f32],
    a: &[u32],
    bp: &[u32],
    rows: usize,
    kp: usize,
    n: usize,
    acc: bool,
) {
    for r in 0..rows {
        for col in 0..n {
            let (jb, j) = (col / 16, col % 16);
            let mut s = 0f32;
            for p in 0..kp {
                let (x, y) = (a[r * kp + p], bp[(jb * kp + p) * 16 + j]);
                s += from_bf16(x as u16) * from_bf16(y as u16)
                    + from_bf16((x >> 16) as u16) * from_bf16((y >> 16) as u16);
            }
            let d = &mut c[r * n + col];
            *d = if acc { *d + s } else { s };
        }
    }
}

/// Intel AMX (Sapphire Rapids and later): 16x16 f32 tiles of C, 16x32 bf16 tiles of A and
/// 16x(16 pairs) tiles of B, `tdpbf16ps` (16x16x32 products per instruction). Stable Rust has
/// no AMX intrinsics, so the instructions are inline assembly; Linux hands out the tile state
/// only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), made once.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::sync::OnceLock;

    /// Whether the CPU has AMX-BF16 and the kernel granted this process the tile state.
    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var_os("MARLIN_NO_AMX").is_some() {
                return false;
            }
            // SAFETY: cpuid leaf 7 exists on every x86-64 CPU that has AVX-512 (checked first).
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = ((leaf.edx >> 22) & 1 == 1, (leaf.edx >> 24) & 1 == 1);
            super::supported() && amx_bf16 && amx_tile && request_tile_state()
        })
    }

    #[cfg(target_os = "linux")]
    fn request_tile_state() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: the arch_prctl system call with a documented request; it only changes this
        // process's permission to use the AMX register state.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret,
                 in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_state() -> bool {
        false
    }

    /// Palette 1, tiles 0-7 all 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// `c[rows, n] (+)= a[rows, kp pairs] · panels`: 32x32 blocks of C in tiles 0-3, A in
    /// tiles 4-5, B in tiles 6-7.
    ///
    /// # Safety
    /// [`available`] is true; rows % 32 == 0, kp % 16 == 0, n % 32 == 0; `c` holds rows x n,
    /// `a` rows x kp, `bp` the packed panels of n columns.
    pub(super) unsafe fn block(
        c: &mut [f32],
        a: &[u32],
        bp: &[u32],
        rows: usize,
        kp: usize,
        n: usize,
        acc: bool,
    ) {
        let mut cfg = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        asm!("ldtilecfg [{0}]", in(reg) &cfg as *const Config, options(nostack));
        let (cs, as_, bs) = (n * 4, kp * 4, 64usize);
        let (c0, a0, b0) = (c.as_mut_ptr(), a.as_ptr(), bp.as_ptr());
        for jb in (0..n / 16).step_by(2) {
            for r in (0..rows).step_by(32) {
                let c00 = c0.add(r * n + jb * 16);
                let c01 = c00.add(16);
                let c10 = c00.add(16 * n);
                let c11 = c10.add(16);
                if acc {
                    asm!("tileloadd tmm0, [{0} + {1}*1]", in(reg) c00, in(reg) cs, options(nostack));
                    asm!("tileloadd tmm1, [{0} + {1}*1]", in(reg) c01, in(reg) cs, options(nostack));
                    asm!("tileloadd tmm2, [{0} + {1}*1]", in(reg) c10, in(reg) cs, options(nostack));
                    asm!("tileloadd tmm3, [{0} + {1}*1]", in(reg) c11, in(reg) cs, options(nostack));
                } else {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack)
                    );
                }
                let ar0 = a0.add(r * kp);
                let ar1 = a0.add((r + 16) * kp);
                let bp0 = b0.add(jb * kp * 16);
                let bp1 = b0.add((jb + 1) * kp * 16);
                for kb in 0..kp / 16 {
                    asm!(
                        "tileloadd tmm4, [{a0} + {as_}*1]",
                        "tileloadd tmm5, [{a1} + {as_}*1]",
                        "tileloadd tmm6, [{b0} + {bs}*1]",
                        "tileloadd tmm7, [{b1} + {bs}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) ar0.add(kb * 16),
                        a1 = in(reg) ar1.add(kb * 16),
                        b0 = in(reg) bp0.add(kb * 256),
                        b1 = in(reg) bp1.add(kb * 256),
                        as_ = in(reg) as_,
                        bs = in(reg) bs,
                        options(nostack),
                    );
                }
                asm!("tilestored [{0} + {1}*1], tmm0", in(reg) c00, in(reg) cs, options(nostack));
                asm!("tilestored [{0} + {1}*1], tmm1", in(reg) c01, in(reg) cs, options(nostack));
                asm!("tilestored [{0} + {1}*1], tmm2", in(reg) c10, in(reg) cs, options(nostack));
                asm!("tilestored [{0} + {1}*1], tmm3", in(reg) c11, in(reg) cs, options(nostack));
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `row` scaled and rounded to bf16 pairs in 32-value chunks (`vcvtne2ps2bf16`, round to
    /// nearest even as [`super::to_bf16`]); returns the number of pairs written.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pairs(row: &[f32], out: &mut [u32], scale: f32) -> usize {
        let chunks = row.len() / 32;
        let s = _mm512_set1_ps(scale);
        for c in 0..chunks {
            let lo = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(32 * c)), s);
            let hi = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(32 * c + 16)), s);
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * c) as *mut _, v);
        }
        chunks * 16
    }

    /// Pairs `(bf16(a[j]), bf16(b[j]))` of two 16-value rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave(a: &[f32], b: &[f32], out: &mut [u32]) {
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(a.as_ptr())));
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(b.as_ptr())));
        let v = _mm512_or_si512(
            _mm512_cvtepu16_epi32(lo),
            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
        );
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, v);
    }

    /// All column panels of `rows` rows: 8-row by 32-column tiles, the rest in smaller ones.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block(
        c: &mut [f32],
        a: &[u32],
        bp: &[u32],
        rows: usize,
        kp: usize,
        n: usize,
        acc: bool,
    ) {
        let nb = n.div_ceil(16);
        let mut jb = 0;
        while jb < nb {
            let two = jb + 1 < nb;
            let cols = if two { 32 } else { 16 }.min(n - jb * 16);
            let mut r = 0;
            while r + 8 <= rows {
                tile::<8>(c, a, bp, r, jb, two, cols, kp, n, acc);
                r += 8;
            }
            while r < rows {
                tile::<1>(c, a, bp, r, jb, two, cols, kp, n, acc);
                r += 1;
            }
            jb += if two { 2 } else { 1 };
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize>(
        c: &mut [f32],
        a: &[u32],
        bp: &[u32],
        r0: usize,
        jb: usize,
        two: bool,
        cols: usize,
        kp: usize,
        n: usize,
        acc: bool,
    ) {
        let mut s0 = [_mm512_setzero_ps(); MR];
        let mut s1 = [_mm512_setzero_ps(); MR];
        let p0 = bp.as_ptr().add(jb * kp * 16);
        // A second panel only when `two`; otherwise the first is read twice and ignored.
        let p1 = if two { p0.add(kp * 16) } else { p0 };
        let ar = a.as_ptr().add(r0 * kp);
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p0.add(p * 16) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(p1.add(p * 16) as *const _));
            for i in 0..MR {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ar.add(i * kp + p) as i32));
                s0[i] = _mm512_dpbf16_ps(s0[i], x, b0);
                s1[i] = _mm512_dpbf16_ps(s1[i], x, b1);
            }
        }
        let col0 = jb * 16;
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u32 << cols) as u16 - 1
        };
        let rest = cols.saturating_sub(16);
        let m1: __mmask16 = if rest >= 16 {
            0xffff
        } else {
            ((1u32 << rest) - 1) as u16
        };
        for i in 0..MR {
            let d = c.as_mut_ptr().add((r0 + i) * n + col0);
            let (mut v0, mut v1) = (s0[i], s1[i]);
            if acc {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, d));
                if m1 != 0 {
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, d.add(16)));
                }
            }
            _mm512_mask_storeu_ps(d, m0, v0);
            if m1 != 0 {
                _mm512_mask_storeu_ps(d.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], [m, k, n]: [usize; 3]) -> Vec<f64> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| r(a[i * k + p]) * r(w[p * n + j])).sum();
            }
        }
        out
    }

    /// The one-pass packing of every head's K and V equals head-by-head packing, on shapes
    /// with every edge: tokens not a multiple of 16 and odd, a head width not a multiple of
    /// 16, two batch items.
    #[test]
    fn kv_panels_equal_packing_head_by_head() {
        for &(b, n, h, hd) in &[(1, 1, 1, 2), (2, 37, 3, 24), (1, 50, 4, 64), (2, 16, 2, 16)] {
            let d = h * hd;
            let qkv: Vec<f32> = (0..b * n * 3 * d)
                .map(|i| (i as f32 * 0.61).cos())
                .collect();
            let (kt, vp) = kv_panels(&qkv, b, n, h, hd);
            // Reused buffers holding other values give the same panels.
            let (mut kt2, mut vp2) = (vec![u32::MAX; kt.len()], vec![u32::MAX; vp.len() + 3]);
            kv_panels_into(&qkv, [b, n, h, hd], &mut kt2, &mut vp2);
            assert_eq!((&kt, &vp), (&kt2, &vp2), "reused buffers {b} {n} {h} {hd}");
            let (k_len, v_len) = (kt.len() / (b * h), vp.len() / (b * h));
            for bi in 0..b {
                for hi in 0..h {
                    let base = bi * n * 3 * d + hi * hd;
                    let bh = bi * h + hi;
                    let want_k = panels_of_transpose(&qkv[base + d..], n, hd, 3 * d);
                    let want_v = panels_strided(&qkv[base + 2 * d..], n, hd, 3 * d);
                    assert_eq!(
                        &kt[bh * k_len..(bh + 1) * k_len],
                        &want_k[..],
                        "K {b} {n} {h} {hd}"
                    );
                    assert_eq!(
                        &vp[bh * v_len..(bh + 1) * v_len],
                        &want_v[..],
                        "V {b} {n} {h} {hd}"
                    );
                }
            }
        }
    }

    /// Panels kept for a weight are reused while its storage lives, and changing the values
    /// the copy-on-write way gives new panels, not the kept ones.
    #[test]
    fn cached_panels_are_reused_and_never_stale() {
        let (k, n) = (10, 20);
        let mut data = std::sync::Arc::new((0..k * n).map(|i| i as f32 / 7.0).collect::<Vec<_>>());
        let owner: Owner = data.clone();
        let a = cached_panels(&owner, &data, k, n);
        assert_eq!(*a, panels(&data, k, n));
        assert!(std::sync::Arc::ptr_eq(
            &a,
            &cached_panels(&owner, &data, k, n)
        ));
        // Another matrix in the same storage (a view of fewer rows) is another entry.
        let top = cached_panels(&owner, &data[..(k / 2) * n], k / 2, n);
        assert_eq!(*top, panels(&data[..(k / 2) * n], k / 2, n));
        drop(owner);
        std::sync::Arc::make_mut(&mut data)[3] = 100.0;
        let owner: Owner = data.clone();
        let b = cached_panels(&owner, &data, k, n);
        assert_eq!(*b, panels(&data, k, n), "stale panels after a change");
        assert_ne!(*a, *b);
    }

    /// The product from kept panels equals the product that packs them, bit for bit.
    #[test]
    fn matmul_from_panels_equals_matmul() {
        let [m, k, n] = [300, 96, 80];
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.13).sin()).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.29).cos()).collect();
        let (mut x, mut y) = (vec![1f32; m * n], vec![1f32; m * n]);
        matmul(&mut x, &a, &w, [m, k, n], true);
        matmul_panels(&mut y, &a, &panels(&w, k, n), [m, k, n], true);
        assert_eq!(x, y);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// Against a naive product of the same bf16-rounded operands in f64, on shapes with every
    /// edge: rows not a multiple of 8, odd k, columns not a multiple of 16 or 32. The CPU's
    /// kernel where it has AVX-512 BF16; the portable loop everywhere.
    #[test]
    fn matches_a_naive_product() {
        // The last three fit AMX tiles (rows % 32, k % 32, n % 32), where the CPU has them.
        for &[m, k, n] in &[
            [1, 1, 1],
            [9, 7, 17],
            [130, 33, 48],
            [16, 64, 40],
            [257, 96, 64],
            [64, 64, 64],
            [160, 96, 96],
            [256, 768, 128],
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 400.0)
                .collect();
            let want = naive(&a, &w, [m, k, n]);
            let base: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            for acc in [false, true] {
                let mut got = base.clone();
                matmul(&mut got, &a, &w, [m, k, n], acc);
                let mut portable = base.clone();
                let kp = k.div_ceil(2);
                portable_block(
                    &mut portable,
                    &pairs_of_rows(&a, m, k, k, 1.0),
                    &panels_strided(&w, k, n, n),
                    m,
                    kp,
                    n,
                    acc,
                );
                for (i, (&g, &p)) in got.iter().zip(&portable).enumerate() {
                    let w = want[i] + if acc { base[i] as f64 } else { 0.0 };
                    let tol = 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt();
                    assert!(
                        (g as f64 - w).abs() <= tol,
                        "[{m},{k},{n}] acc {acc} at {i}: {g} vs {w}"
                    );
                    assert!(
                        (p as f64 - w).abs() <= tol,
                        "portable [{m},{k},{n}] at {i}: {p} vs {w}"
                    );
                }
            }
        }
    }
}
