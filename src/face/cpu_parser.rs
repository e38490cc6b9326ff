//! The face parser's networks ([`super::mesh`], [`super::selfie`]) on the host CPU, for the
//! default (`Flex`) backend, as the MTCNN nets have ([`super::cpu_nets`]): one image at a time
//! in NHWC, pointwise convolutions as one matrix product (the `gemm` crate), depthwise ones as
//! a loop over channels that vectorises, images in parallel on rayon. burn 0.21's `Flex`
//! conv2d runs these small depthwise layers slowly (about 25 ms per image for either network);
//! same weights, same results (`tests/suite/face_parser.rs` checks both paths against TFLite).

use super::cpu_nets::{host, matmul_acc, prelu};
use super::layers::{same_padding, Conv, Gate, PRelu, Upconv};
use super::mesh::{FaceMesh, Head, Residual, MESH_POINTS};
use super::selfie::{Bottleneck, SelfieSegmentation, Up};
use burn::tensor::backend::Backend;

/// One image, `[h, w, c]` row-major.
#[derive(Debug, Clone)]
pub struct Img {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub d: Vec<f32>,
}

impl Img {
    /// From channels-first `[c, h, w]` data.
    pub fn from_chw(x: &[f32], c: usize, h: usize, w: usize) -> Self {
        let mut d = vec![0f32; c * h * w];
        for ci in 0..c {
            for p in 0..h * w {
                d[p * c + ci] = x[ci * h * w + p];
            }
        }
        Self { h, w, c, d }
    }
    fn map(mut self, f: impl Fn(f32) -> f32) -> Self {
        self.d.iter_mut().for_each(|v| *v = f(*v));
        self
    }
    /// `self + other`, other's channels added to the first ones (zero channels appended).
    fn add(mut self, other: &Img) -> Self {
        let (c, oc) = (self.c, other.c);
        for (y, x) in self.d.chunks_exact_mut(c).zip(other.d.chunks_exact(oc)) {
            y[..oc].iter_mut().zip(x).for_each(|(a, b)| *a += b);
        }
        self
    }
    /// Multiply every pixel by a per-channel `[c]` gate, or elementwise by an image.
    fn scale(mut self, g: &[f32]) -> Self {
        for px in self.d.chunks_exact_mut(self.c) {
            px.iter_mut().zip(g).for_each(|(a, b)| *a *= b);
        }
        self
    }
    fn mean(&self) -> Img {
        let mut m = vec![0f32; self.c];
        for px in self.d.chunks_exact(self.c) {
            m.iter_mut().zip(px).for_each(|(a, b)| *a += b);
        }
        let n = (self.h * self.w) as f32;
        m.iter_mut().for_each(|v| *v /= n);
        Img {
            h: 1,
            w: 1,
            c: self.c,
            d: m,
        }
    }
    fn max_pool2(&self) -> Img {
        let (oh, ow, c) = (self.h / 2, self.w / 2, self.c);
        let mut d = vec![f32::NEG_INFINITY; oh * ow * c];
        for y in 0..oh * 2 {
            for x in 0..ow * 2 {
                let src = &self.d[(y * self.w + x) * c..][..c];
                let dst = &mut d[((y / 2) * ow + x / 2) * c..][..c];
                dst.iter_mut().zip(src).for_each(|(a, &b)| *a = a.max(b));
            }
        }
        Img { h: oh, w: ow, c, d }
    }
    /// 2x bilinear upsampling with half-pixel centres (as [`super::layers::upsample2`]): each
    /// output row blends two input rows, then each output pixel two pixels of that row.
    fn upsample2(&self) -> Img {
        let (h, w, c) = (self.h, self.w, self.c);
        // Output i's two taps (weights 0.75 and 0.25): i / 2, and its neighbour on i's side.
        let tap = |o: usize, n: usize| -> (usize, usize) {
            let i = o / 2;
            if o.is_multiple_of(2) {
                (i, i.saturating_sub(1))
            } else {
                (i, (i + 1).min(n - 1))
            }
        };
        let row = w * c;
        let mut d = vec![0f32; 4 * h * w * c];
        let mut blend = vec![0f32; row];
        for oy in 0..2 * h {
            let (y0, y1) = tap(oy, h);
            let (r0, r1) = (&self.d[y0 * row..][..row], &self.d[y1 * row..][..row]);
            for ((b, &p), &q) in blend.iter_mut().zip(r0).zip(r1) {
                *b = 0.75 * p + 0.25 * q;
            }
            let out = &mut d[oy * 2 * row..][..2 * row];
            for ox in 0..2 * w {
                let (x0, x1) = tap(ox, w);
                let (p, q) = (&blend[x0 * c..][..c], &blend[x1 * c..][..c]);
                for ((o, &p), &q) in out[ox * c..][..c].iter_mut().zip(p).zip(q) {
                    *o = 0.75 * p + 0.25 * q;
                }
            }
        }
        Img {
            h: 2 * h,
            w: 2 * w,
            c,
            d,
        }
    }
}

fn relu(v: f32) -> f32 {
    v.max(0.0)
}
fn hswish(v: f32) -> f32 {
    v * (v / 6.0 + 0.5).clamp(0.0, 1.0)
}
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// A convolution (dense or depthwise; TensorFlow `SAME` or no padding) on the host.
struct HConv {
    k: usize,
    stride: usize,
    same: bool,
    c: usize,
    o: usize,
    depthwise: bool,
    /// Dense: `[k * k * c, o]` (rows in (ky, kx, c) order); depthwise: `[k * k, c]`.
    w: Vec<f32>,
    bias: Vec<f32>,
}

impl HConv {
    fn new<B: Backend>(conv: &Conv<B>) -> Self {
        let [o, ci, k, _] = conv.weight.dims();
        let src = host(conv.weight.clone());
        let depthwise = conv.groups > 1;
        let c = if depthwise { o } else { ci };
        let mut w = vec![0f32; k * k * c * if depthwise { 1 } else { o }];
        for oi in 0..o {
            for i in 0..ci {
                for ky in 0..k {
                    for kx in 0..k {
                        let v = src[((oi * ci + i) * k + ky) * k + kx];
                        if depthwise {
                            w[(ky * k + kx) * c + oi] = v;
                        } else {
                            w[((ky * k + kx) * c + i) * o + oi] = v;
                        }
                    }
                }
            }
        }
        Self {
            k,
            stride: conv.stride,
            same: conv.same,
            c,
            o,
            depthwise,
            w,
            bias: host(conv.bias.clone()),
        }
    }

    /// Output size and leading padding of one axis.
    fn axis(&self, n: usize) -> (usize, usize) {
        if self.same && self.k > 1 {
            (
                n.div_ceil(self.stride),
                same_padding(n, self.k, self.stride).0,
            )
        } else {
            ((n - self.k) / self.stride + 1, 0)
        }
    }

    fn forward(&self, x: &Img) -> Img {
        debug_assert_eq!(x.c, self.c);
        let ((oh, pt), (ow, pl)) = (self.axis(x.h), self.axis(x.w));
        let (k, s, c) = (self.k, self.stride, self.c);
        let mut d = Vec::with_capacity(oh * ow * self.o);
        for _ in 0..oh * ow {
            d.extend_from_slice(&self.bias);
        }
        let inside = |oy: usize, ky: usize, pad: usize, n: usize| {
            (oy * s + ky).checked_sub(pad).filter(|&i| i < n)
        };
        if self.depthwise {
            // Per tap, the output columns whose input column is inside the frame, found once.
            let cols = |kx: usize| -> (usize, usize) {
                let lo = pl.saturating_sub(kx).div_ceil(s);
                let hi = match (x.w + pl).checked_sub(kx + 1) {
                    Some(last) => (last / s + 1).min(ow),
                    None => 0,
                };
                (lo, hi.max(lo))
            };
            for oy in 0..oh {
                let drow = &mut d[oy * ow * c..][..ow * c];
                for ky in 0..k {
                    let Some(iy) = inside(oy, ky, pt, x.h) else {
                        continue;
                    };
                    let srow = &x.d[iy * x.w * c..][..x.w * c];
                    for kx in 0..k {
                        let wk = &self.w[(ky * k + kx) * c..][..c];
                        let (lo, hi) = cols(kx);
                        for ox in lo..hi {
                            let ix = ox * s + kx - pl;
                            let dst = &mut drow[ox * c..][..c];
                            for ((a, &v), &g) in dst.iter_mut().zip(&srow[ix * c..][..c]).zip(wk) {
                                *a += v * g;
                            }
                        }
                    }
                }
            }
        } else if k == 1 && s == 1 {
            matmul_acc(&mut d, &x.d, &self.w, x.h * x.w, c, self.o);
        } else {
            let kk = k * k * c;
            let mut cols = vec![0f32; oh * ow * kk];
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = &mut cols[(oy * ow + ox) * kk..][..kk];
                    for ky in 0..k {
                        let Some(iy) = inside(oy, ky, pt, x.h) else {
                            continue;
                        };
                        for kx in 0..k {
                            if let Some(ix) = inside(ox, kx, pl, x.w) {
                                row[(ky * k + kx) * c..][..c]
                                    .copy_from_slice(&x.d[(iy * x.w + ix) * c..][..c]);
                            }
                        }
                    }
                }
            }
            matmul_acc(&mut d, &cols, &self.w, oh * ow, kk, self.o);
        }
        Img {
            h: oh,
            w: ow,
            c: self.o,
            d,
        }
    }
}

struct HPRelu(Vec<f32>);

impl HPRelu {
    fn new<B: Backend>(p: &PRelu<B>) -> Self {
        Self(host(p.alpha.clone()))
    }
    fn forward(&self, mut x: Img) -> Img {
        prelu(&mut x.d, &self.0);
        x
    }
}

struct HGate(HConv, HConv);

impl HGate {
    fn new<B: Backend>(g: &Gate<B>) -> Self {
        Self(HConv::new(&g.down), HConv::new(&g.up))
    }
    /// The `[c]` channel gate of `x`.
    fn forward(&self, x: &Img) -> Vec<f32> {
        let g = self.1.forward(&self.0.forward(&x.mean()).map(relu));
        g.map(sigmoid).d
    }
}

struct HResidual {
    depthwise: HConv,
    pointwise: HConv,
    prelu: HPRelu,
}

impl HResidual {
    fn new<B: Backend>(r: &Residual<B>) -> Self {
        Self {
            depthwise: HConv::new(&r.depthwise),
            pointwise: HConv::new(&r.pointwise),
            prelu: HPRelu::new(&r.prelu),
        }
    }
    fn forward(&self, x: &Img) -> Img {
        let y = self.pointwise.forward(&self.depthwise.forward(x));
        let y = if self.depthwise.stride == 2 {
            y.add(&x.max_pool2())
        } else {
            y.add(x)
        };
        self.prelu.forward(y)
    }
}

struct HHead {
    blocks: Vec<HResidual>,
    narrow: HConv,
    narrow_prelu: HPRelu,
    last_block: HResidual,
    out: HConv,
}

impl HHead {
    fn new<B: Backend>(h: &Head<B>) -> Self {
        Self {
            blocks: h.blocks.iter().map(HResidual::new).collect(),
            narrow: HConv::new(&h.narrow),
            narrow_prelu: HPRelu::new(&h.narrow_prelu),
            last_block: HResidual::new(&h.last_block),
            out: HConv::new(&h.out),
        }
    }
    fn forward(&self, x: &Img) -> Vec<f32> {
        let mut x = x.clone();
        for b in &self.blocks {
            x = b.forward(&x);
        }
        let x = self.narrow_prelu.forward(self.narrow.forward(&x));
        self.out.forward(&self.last_block.forward(&x)).d
    }
}

/// [`FaceMesh`] on the host.
pub struct HostMesh {
    stem: HConv,
    stem_prelu: HPRelu,
    trunk: Vec<HResidual>,
    landmarks: HHead,
    presence: HHead,
}

impl HostMesh {
    pub fn new<B: Backend>(m: &FaceMesh<B>) -> Self {
        Self {
            stem: HConv::new(&m.stem),
            stem_prelu: HPRelu::new(&m.stem_prelu),
            trunk: m.trunk.iter().map(HResidual::new).collect(),
            landmarks: HHead::new(&m.landmarks),
            presence: HHead::new(&m.presence),
        }
    }

    /// One `[192, 192, 3]` image -> (468 x 3 landmark values, face-presence logit).
    pub fn forward(&self, x: &Img) -> (Vec<f32>, f32) {
        let mut x = self.stem_prelu.forward(self.stem.forward(x));
        for b in &self.trunk {
            x = b.forward(&x);
        }
        let points = self.landmarks.forward(&x);
        debug_assert_eq!(points.len(), MESH_POINTS * 3);
        (points, self.presence.forward(&x)[0])
    }
}

struct HBottleneck {
    expand: HConv,
    depthwise: HConv,
    gate: Option<HGate>,
    project: HConv,
    hswish: bool,
    residual: bool,
}

impl HBottleneck {
    fn new<B: Backend>(b: &Bottleneck<B>) -> Self {
        Self {
            expand: HConv::new(&b.expand),
            depthwise: HConv::new(&b.depthwise),
            gate: b.gate.as_ref().map(HGate::new),
            project: HConv::new(&b.project),
            hswish: b.hswish,
            residual: b.residual,
        }
    }
    fn forward(&self, x: &Img) -> Img {
        let act = if self.hswish { hswish } else { relu };
        let mut y = self
            .depthwise
            .forward(&self.expand.forward(x).map(act))
            .map(act);
        if let Some(g) = &self.gate {
            let gate = g.forward(&y);
            y = y.scale(&gate);
        }
        let y = self.project.forward(&y);
        if self.residual {
            y.add(x)
        } else {
            y
        }
    }
}

struct HUp {
    narrow: HConv,
    gate: HGate,
    mix: HConv,
    depthwise: HConv,
}

impl HUp {
    fn new<B: Backend>(u: &Up<B>) -> Self {
        Self {
            narrow: HConv::new(&u.narrow),
            gate: HGate::new(&u.gate),
            mix: HConv::new(&u.mix),
            depthwise: HConv::new(&u.depthwise),
        }
    }
    fn forward(&self, x: &Img, skip: &Img) -> Img {
        let up = self.narrow.forward(&x.upsample2());
        let g = self.gate.forward(&skip.clone().add(&up));
        let merged = skip.clone().scale(&g).add(&up);
        let a = self.mix.forward(&merged).map(relu);
        let b = self.depthwise.forward(&a).map(relu);
        a.add(&b)
    }
}

/// [`SelfieSegmentation`] on the host.
pub struct HostSelfie {
    stem: HConv,
    stage1: HBottleneck,
    stage2: Vec<HBottleneck>,
    stage3: Vec<HBottleneck>,
    context: HConv,
    context_gate: HConv,
    up32: HUp,
    up64: HUp,
    up128: HUp,
    /// The 2x2 stride-2 transposed convolution: `[c, (dy, dx, o)]` and its bias.
    segment: (Vec<f32>, Vec<f32>, usize, usize),
}

impl HostSelfie {
    pub fn new<B: Backend>(s: &SelfieSegmentation<B>) -> Self {
        let up: &Upconv<B> = &s.segment;
        let [c, o, k, _] = up.weight.dims();
        assert!(
            o == 1 && k == 2,
            "the selfie network ends in one 2x2 output channel"
        );
        let src = host(up.weight.clone());
        let mut w = vec![0f32; c * k * k * o];
        for ci in 0..c {
            for oi in 0..o {
                for dy in 0..k {
                    for dx in 0..k {
                        w[ci * k * k * o + (dy * k + dx) * o + oi] =
                            src[((ci * o + oi) * k + dy) * k + dx];
                    }
                }
            }
        }
        Self {
            stem: HConv::new(&s.stem),
            stage1: HBottleneck::new(&s.stage1),
            stage2: s.stage2.iter().map(HBottleneck::new).collect(),
            stage3: s.stage3.iter().map(HBottleneck::new).collect(),
            context: HConv::new(&s.context),
            context_gate: HConv::new(&s.context_gate),
            up32: HUp::new(&s.up32),
            up64: HUp::new(&s.up64),
            up128: HUp::new(&s.up128),
            segment: (w, host(up.bias.clone()), c, o),
        }
    }

    /// One `[256, 256, 3]` image -> person probabilities `[256 * 256]`.
    pub fn forward(&self, x: &Img) -> Vec<f32> {
        let s128 = self.stem.forward(x).map(hswish);
        let s64 = self.stage1.forward(&s128);
        let mut s32 = s64.clone();
        for b in &self.stage2 {
            s32 = b.forward(&s32);
        }
        let mut x = s32.clone();
        for b in &self.stage3 {
            x = b.forward(&x);
        }
        let g = self.context_gate.forward(&x.mean()).map(sigmoid).d;
        let x = self.context.forward(&x).map(relu).scale(&g);
        let x = self.up32.forward(&x, &s32);
        let x = self.up64.forward(&x, &s64);
        let x = self.up128.forward(&x, &s128);
        // Transposed 2x2 stride 2: one product, then each input pixel fills a 2x2 block.
        let (w, bias, c, o) = &self.segment;
        let (h, wd) = (x.h, x.w);
        let mut y = vec![0f32; h * wd * 4 * o];
        matmul_acc(&mut y, &x.d, w, h * wd, *c, 4 * o);
        let mut out = vec![0f32; 4 * h * wd];
        for iy in 0..h {
            for ix in 0..wd {
                for dy in 0..2 {
                    for dx in 0..2 {
                        // One output channel: the person logit.
                        let v = y[(iy * wd + ix) * 4 * o + (dy * 2 + dx) * o] + bias[0];
                        out[(2 * iy + dy) * 2 * wd + 2 * ix + dx] = sigmoid(v);
                    }
                }
            }
        }
        out
    }
}
