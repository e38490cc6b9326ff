//! MTCNN's networks on the host CPU, for the default (`Flex`) backend: NHWC, convolutions as
//! im2col + one matrix product (the `gemm` crate), PReLU fused into the product's output, one
//! image per rayon task. burn 0.21's `Flex` conv2d runs these small-channel convolutions at
//! about 4 GMAC/s; this path is ~10x faster (BENCHMARKS.md). Same weights, same results
//! (tests/suite/face_nets.rs and tests/suite/face_detect.rs run the networks through the detector).

use super::mtcnn::{Conv, Mtcnn};
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

pub(super) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // Float parameters convert to f32 without loss of meaning.
    crate::model::load::to_f32_vec(t)
}

/// A k x k convolution (stride 1, no padding) with weights as `[k * k * C, O]` (rows in
/// (ky, kx, c) order) and its PReLU slopes (none for output heads).
struct HConv {
    k: usize,
    c: usize,
    o: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
    alpha: Option<Vec<f32>>,
}

impl HConv {
    fn new<B: Backend>(conv: &Conv<B>, alpha: Option<&Param<Tensor<B, 1>>>) -> Self {
        let [o, c, k, _] = conv.weight.val().dims();
        let src = host(conv.weight.val());
        let mut w = vec![0f32; k * k * c * o];
        for oi in 0..o {
            for ci in 0..c {
                for ky in 0..k {
                    for kx in 0..k {
                        w[((ky * k + kx) * c + ci) * o + oi] =
                            src[((oi * c + ci) * k + ky) * k + kx];
                    }
                }
            }
        }
        Self {
            k,
            c,
            o,
            w,
            bias: host(conv.bias.val()),
            alpha: alpha.map(|a| host(a.val())),
        }
    }

    /// `[H, W, C]` -> `[H-k+1, W-k+1, O]`. The im2col matrix is built a band of output rows
    /// at a time (about 512 KB), so large frames do not allocate (and fault in) tens of MB.
    fn forward(&self, x: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let (k, c, o) = (self.k, self.c, self.o);
        let (oh, ow) = (h + 1 - k, w + 1 - k);
        let kk = k * k * c;
        let band = ((1usize << 17) / (ow * kk).max(1)).clamp(1, oh.max(1));
        let mut cols = vec![0f32; band * ow * kk];
        let mut out: Vec<f32> = Vec::with_capacity(oh * ow * o);
        for _ in 0..oh * ow {
            out.extend_from_slice(&self.bias);
        }
        for r0 in (0..oh).step_by(band) {
            let rows = band.min(oh - r0);
            for y in 0..rows {
                for xx in 0..ow {
                    let dst = &mut cols[(y * ow + xx) * kk..(y * ow + xx + 1) * kk];
                    for ky in 0..k {
                        let s = ((r0 + y + ky) * w + xx) * c;
                        dst[ky * k * c..(ky + 1) * k * c].copy_from_slice(&x[s..s + k * c]);
                    }
                }
            }
            matmul_acc(
                &mut out[r0 * ow * o..(r0 + rows) * ow * o],
                &cols[..rows * ow * kk],
                &self.w,
                rows * ow,
                kk,
                o,
            );
        }
        if let Some(a) = &self.alpha {
            prelu(&mut out, a);
        }
        (out, oh, ow)
    }
}

/// `dst[m, n] += a[m, k] @ b[k, n]`, row-major, single-threaded (callers parallelise over
/// images).
pub(super) fn matmul_acc(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    crate::kernels::cpu::matmul_with(dst, a, b, [m, k, n], true, false);
}

pub(super) fn prelu(x: &mut [f32], a: &[f32]) {
    for px in x.chunks_exact_mut(a.len()) {
        for (v, &s) in px.iter_mut().zip(a) {
            if *v < 0.0 {
                *v *= s;
            }
        }
    }
}

/// Max pooling, stride `s`, window `k`, PyTorch's ceil_mode=True sizes, on `[H, W, C]`.
fn pool(x: &[f32], h: usize, w: usize, c: usize, k: usize, s: usize) -> (Vec<f32>, usize, usize) {
    let size = |n: usize| {
        let mut o = (n.saturating_sub(k)).div_ceil(s) + 1;
        if (o - 1) * s >= n {
            o -= 1;
        }
        o
    };
    let (oh, ow) = (size(h), size(w));
    let mut out = vec![f32::NEG_INFINITY; oh * ow * c];
    for y in 0..oh {
        for xx in 0..ow {
            let d = &mut out[(y * ow + xx) * c..(y * ow + xx + 1) * c];
            for iy in y * s..(y * s + k).min(h) {
                for ix in xx * s..(xx * s + k).min(w) {
                    let src = &x[(iy * w + ix) * c..(iy * w + ix + 1) * c];
                    for (a, &b) in d.iter_mut().zip(src) {
                        *a = a.max(b);
                    }
                }
            }
        }
    }
    (out, oh, ow)
}

/// A dense layer `[in] -> [out]` with optional PReLU.
struct HDense {
    w: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    alpha: Option<Vec<f32>>,
}

impl HDense {
    fn new<B: Backend>(l: &Linear<B>, alpha: Option<&Param<Tensor<B, 1>>>) -> Self {
        // burn stores Linear weights as [d_in, d_out].
        let [_, n] = l.weight.val().dims();
        Self {
            w: host(l.weight.val()),
            bias: l
                .bias
                .as_ref()
                .map(|b| host(b.val()))
                .unwrap_or(vec![0.0; n]),
            n,
            alpha: alpha.map(|a| host(a.val())),
        }
    }
    /// `[B, in]` -> `[B, out]`.
    fn forward(&self, x: &[f32], b: usize) -> Vec<f32> {
        let k = x.len() / b.max(1);
        let mut out: Vec<f32> = Vec::with_capacity(b * self.n);
        for _ in 0..b {
            out.extend_from_slice(&self.bias);
        }
        matmul_acc(&mut out, x, &self.w, b, k, self.n);
        if let Some(a) = &self.alpha {
            prelu(&mut out, a);
        }
        out
    }
}

/// Flatten `[H, W, C]` in (W, H, C) order, as facenet-pytorch's permute(0, 3, 2, 1).
fn flatten_whc(x: &[f32], h: usize, w: usize, c: usize, dst: &mut Vec<f32>) {
    for xx in 0..w {
        for y in 0..h {
            dst.extend_from_slice(&x[(y * w + xx) * c..(y * w + xx + 1) * c]);
        }
    }
}

/// Two-class softmax: the probability of class 1.
fn p_face(a0: f32, a1: f32) -> f32 {
    1.0 / (1.0 + (a0 - a1).exp())
}

/// The three networks' weights on the host.
pub struct HostMtcnn {
    p: [HConv; 5],
    r: [HConv; 3],
    r_dense: [HDense; 3],
    o: [HConv; 4],
    o_dense: [HDense; 4],
}

impl HostMtcnn {
    pub fn new<B: Backend>(m: &Mtcnn<B>) -> Self {
        let (p, r, o) = (&m.pnet, &m.rnet, &m.onet);
        Self {
            p: [
                HConv::new(&p.conv1, Some(&p.prelu1)),
                HConv::new(&p.conv2, Some(&p.prelu2)),
                HConv::new(&p.conv3, Some(&p.prelu3)),
                HConv::new(&p.conv4_1, None),
                HConv::new(&p.conv4_2, None),
            ],
            r: [
                HConv::new(&r.conv1, Some(&r.prelu1)),
                HConv::new(&r.conv2, Some(&r.prelu2)),
                HConv::new(&r.conv3, Some(&r.prelu3)),
            ],
            r_dense: [
                HDense::new(&r.dense4, Some(&r.prelu4)),
                HDense::new(&r.dense5_1, None),
                HDense::new(&r.dense5_2, None),
            ],
            o: [
                HConv::new(&o.conv1, Some(&o.prelu1)),
                HConv::new(&o.conv2, Some(&o.prelu2)),
                HConv::new(&o.conv3, Some(&o.prelu3)),
                HConv::new(&o.conv4, Some(&o.prelu4)),
            ],
            o_dense: [
                HDense::new(&o.dense5, Some(&o.prelu5)),
                HDense::new(&o.dense6_1, None),
                HDense::new(&o.dense6_2, None),
                HDense::new(&o.dense6_3, None),
            ],
        }
    }

    /// P-Net on `n` images `[n, h, w, 3]` -> (regression `[n, 4, ph, pw]`, face probability
    /// `[n, ph, pw]`, ph, pw).
    pub fn pnet(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f32>, Vec<f32>, usize, usize) {
        let per: Vec<(Vec<f32>, Vec<f32>, usize, usize)> = x
            .par_chunks(h * w * 3)
            .take(n)
            .map(|img| {
                let (a, h1, w1) = self.p[0].forward(img, h, w);
                let (a, h1, w1) = pool(&a, h1, w1, 10, 2, 2);
                let (a, h1, w1) = self.p[1].forward(&a, h1, w1);
                let (a, h1, w1) = self.p[2].forward(&a, h1, w1);
                let (logits, ph, pw) = self.p[3].forward(&a, h1, w1);
                let (reg, _, _) = self.p[4].forward(&a, h1, w1);
                let prob = logits.chunks_exact(2).map(|l| p_face(l[0], l[1])).collect();
                // [ph, pw, 4] -> [4, ph, pw]
                let mut r = vec![0f32; 4 * ph * pw];
                for (i, v) in reg.chunks_exact(4).enumerate() {
                    for c in 0..4 {
                        r[c * ph * pw + i] = v[c];
                    }
                }
                (r, prob, ph, pw)
            })
            .collect();
        let (ph, pw) = per.first().map(|p| (p.2, p.3)).unwrap_or((0, 0));
        let mut reg = Vec::with_capacity(n * 4 * ph * pw);
        let mut prob = Vec::with_capacity(n * ph * pw);
        for (r, p, _, _) in per {
            reg.extend(r);
            prob.extend(p);
        }
        (reg, prob, ph, pw)
    }

    /// Convolutional trunk of R-Net / O-Net on each `[s, s, 3]` crop, flattened (W, H, C).
    fn trunk(
        &self,
        convs: &[HConv],
        pools: &[(usize, usize)],
        x: &[f32],
        n: usize,
        s: usize,
    ) -> Vec<f32> {
        let per: Vec<Vec<f32>> = x
            .par_chunks(s * s * 3)
            .take(n)
            .map(|img| {
                let (mut a, mut h, mut w) = (img.to_vec(), s, s);
                for (i, conv) in convs.iter().enumerate() {
                    let (y, h1, w1) = conv.forward(&a, h, w);
                    (a, h, w) = (y, h1, w1);
                    if let Some(&(k, st)) = pools.get(i) {
                        let (y, h1, w1) = pool(&a, h, w, conv.o, k, st);
                        (a, h, w) = (y, h1, w1);
                    }
                }
                let mut flat = Vec::with_capacity(a.len());
                flatten_whc(&a, h, w, convs[convs.len() - 1].o, &mut flat);
                flat
            })
            .collect();
        per.concat()
    }

    /// R-Net on `n` crops `[n, 24, 24, 3]` -> (regression `[n, 4]`, probabilities `[n, 2]`).
    pub fn rnet(&self, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let f = self.trunk(&self.r, &[(3, 2), (3, 2)], x, n, 24);
        let f = self.r_dense[0].forward(&f, n);
        let logits = self.r_dense[1].forward(&f, n);
        let prob = logits
            .chunks_exact(2)
            .flat_map(|l| {
                let p = p_face(l[0], l[1]);
                [1.0 - p, p]
            })
            .collect();
        (self.r_dense[2].forward(&f, n), prob)
    }

    /// O-Net on `n` crops `[n, 48, 48, 3]` -> (regression `[n, 4]`, landmarks `[n, 10]`,
    /// probabilities `[n, 2]`).
    pub fn onet(&self, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let f = self.trunk(&self.o, &[(3, 2), (3, 2), (2, 2)], x, n, 48);
        let f = self.o_dense[0].forward(&f, n);
        let logits = self.o_dense[1].forward(&f, n);
        let prob = logits
            .chunks_exact(2)
            .flat_map(|l| {
                let p = p_face(l[0], l[1]);
                [1.0 - p, p]
            })
            .collect();
        (
            self.o_dense[2].forward(&f, n),
            self.o_dense[3].forward(&f, n),
            prob,
        )
    }
}
