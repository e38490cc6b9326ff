//! MTCNN face detection: image pyramid -> P-Net proposals -> R-Net refinement -> O-Net boxes,
//! scores and 5 landmarks, with the semantics of facenet-pytorch 2.6's `detect_face` (so its
//! boxes are ours to within float rounding, tests/suite/face_detect.rs). The networks run on the
//! backend's device, batched over frames and candidates; the bookkeeping (resizing, NMS, box
//! calibration) is plain Rust on the host.

use super::cpu_nets::HostMtcnn;
use super::mtcnn::Mtcnn;
use crate::model::weights::WeightsError;
use crate::video::Frame;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;

/// One detected face in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Face {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// O-Net face probability.
    pub score: f32,
    /// Right eye, left eye, nose, right mouth corner, left mouth corner (image left to right for
    /// a frontal face), each `[x, y]`.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    pub fn width(&self) -> f32 {
        self.bbox[2] - self.bbox[0]
    }
    pub fn height(&self) -> f32 {
        self.bbox[3] - self.bbox[1]
    }
    pub fn area(&self) -> f32 {
        self.width().max(0.0) * self.height().max(0.0)
    }
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Detector settings, facenet-pytorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Smallest face side searched, pixels (20). Larger is faster: the pyramid starts lower.
    pub min_face_size: f64,
    /// P-Net, R-Net, O-Net probability thresholds (0.6, 0.7, 0.7).
    pub thresholds: [f32; 3],
    /// Pyramid scale step (0.709).
    pub factor: f64,
    /// Detect on a copy of the frame scaled down to this longest side (boxes and landmarks
    /// are mapped back); None: full resolution. 640 makes HD video several times faster; the
    /// smallest face found grows by the same factor.
    pub max_side: Option<usize>,
}

impl Default for DetectOptions {
    fn default() -> Self {
        Self {
            min_face_size: 20.0,
            thresholds: [0.6, 0.7, 0.7],
            factor: 0.709,
            max_side: None,
        }
    }
}

/// Candidates per R-Net / O-Net forward pass (bounds memory on a GPU).
const NET_BATCH: usize = 512;

/// A candidate box through the cascade.
#[derive(Debug, Clone, Copy)]
struct Cand {
    image: usize,
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

/// MTCNN on a backend: the three networks and the settings.
pub struct Detector<B: Backend> {
    nets: Mtcnn<B>,
    /// The networks on the host for the default CPU backend (much faster than its conv2d).
    host: Option<HostMtcnn>,
    device: B::Device,
    pub opts: DetectOptions,
}

impl<B: Backend> Detector<B> {
    /// The detector with the embedded pretrained weights.
    pub fn new(device: &B::Device, opts: DetectOptions) -> Result<Self, WeightsError> {
        let nets = Mtcnn::embedded(device)?;
        let host = (B::name(device) == "flex").then(|| HostMtcnn::new(&nets));
        Ok(Self {
            nets,
            host,
            device: device.clone(),
            opts,
        })
    }

    /// Run the networks through burn even on the CPU backend (the path a GPU takes; tests
    /// compare it with the host path).
    pub fn without_host_nets(mut self) -> Self {
        self.host = None;
        self
    }

    /// The pyramid scales for a `h` x `w` frame (facenet-pytorch's loop, in f64).
    pub fn scales(&self, h: usize, w: usize) -> Vec<f64> {
        let m = 12.0 / self.opts.min_face_size;
        let mut minl = h.min(w) as f64 * m;
        let mut scale = m;
        let mut out = Vec::new();
        while minl >= 12.0 {
            out.push(scale);
            scale *= self.opts.factor;
            minl *= self.opts.factor;
        }
        out
    }

    /// Faces in each frame, best score first. Frames of different sizes are detected in
    /// groups of equal size.
    pub fn detect(&self, frames: &[&Frame]) -> Vec<Vec<Face>> {
        let mut out = vec![Vec::new(); frames.len()];
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let key = (f.width, f.height);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for ((w, h), idx) in groups {
            let group: Vec<&Frame> = idx.iter().map(|&i| frames[i]).collect();
            let limit = self.opts.max_side.filter(|&m| m > 0 && w.max(h) > m);
            let found = match limit {
                None => self.detect_same_size(&group),
                Some(m) => {
                    let s = m as f64 / w.max(h) as f64;
                    let (sw, sh) = (
                        ((w as f64 * s).round() as usize).max(1),
                        ((h as f64 * s).round() as usize).max(1),
                    );
                    let small: Vec<Frame> = group
                        .par_iter()
                        .map(|f| crate::video::resize_frame(f, sw, sh))
                        .collect();
                    let refs: Vec<&Frame> = small.iter().collect();
                    let (kx, ky) = (w as f32 / sw as f32, h as f32 / sh as f32);
                    self.detect_same_size(&refs)
                        .into_iter()
                        .map(|faces| {
                            faces
                                .into_iter()
                                .map(|f| Face {
                                    bbox: [
                                        f.bbox[0] * kx,
                                        f.bbox[1] * ky,
                                        f.bbox[2] * kx,
                                        f.bbox[3] * ky,
                                    ],
                                    landmarks: f.landmarks.map(|p| [p[0] * kx, p[1] * ky]),
                                    ..f
                                })
                                .collect()
                        })
                        .collect()
                }
            };
            for (i, faces) in idx.into_iter().zip(found) {
                out[i] = faces;
            }
        }
        out
    }

    /// `[n, h, w, 3]` host data -> an `[n, 3, h, w]` tensor on the device.
    fn nchw(&self, x: Vec<f32>, n: usize, h: usize, w: usize) -> Tensor<B, 4> {
        Tensor::<B, 4>::from_data(TensorData::new(x, [n, h, w, 3]), &self.device)
            .permute([0, 3, 1, 2])
    }

    /// P-Net on `[n, h, w, 3]` -> (regression `[n, 4, ph, pw]`, face probability
    /// `[n, ph, pw]`, ph, pw).
    fn pnet(
        &self,
        x: Vec<f32>,
        n: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f32>, Vec<f32>, usize, usize) {
        if let Some(hn) = &self.host {
            return hn.pnet(&x, n, h, w);
        }
        let (reg, prob) = self.nets.pnet.forward(self.nchw(x, n, h, w));
        let [_, _, ph, pw] = prob.dims();
        let prob = prob.narrow(1, 1, 1);
        (host(reg), host(prob), ph, pw)
    }

    fn detect_same_size(&self, frames: &[&Frame]) -> Vec<Vec<Face>> {
        let n = frames.len();
        if n == 0 || frames[0].width == 0 || frames[0].height == 0 {
            return vec![Vec::new(); n];
        }
        let (w, h) = (frames[0].width, frames[0].height);
        let [t1, t2, t3] = self.opts.thresholds;

        // Stage 1: P-Net over the pyramid; NMS 0.5 per scale and image, then 0.7 per image.
        let mut cands = Vec::new();
        for scale in self.scales(h, w) {
            let oh = (h as f64 * scale + 1.0) as usize;
            let ow = (w as f64 * scale + 1.0) as usize;
            let data: Vec<f32> = frames
                .par_iter()
                .flat_map_iter(|f| area_resize(f, [0, 0, w, h], oh, ow))
                .collect();
            let (reg, prob, ph, pw) = self.pnet(data, n, oh, ow);
            let plane = ph * pw;
            for img in 0..n {
                let mut found = Vec::new();
                for y in 0..ph {
                    for x in 0..pw {
                        let p = prob[img * plane + y * pw + x];
                        if p < t1 {
                            continue;
                        }
                        let r = |c: usize| reg[(img * 4 + c) * plane + y * pw + x];
                        let s = scale as f32;
                        let (bx, by) = (x as f32, y as f32);
                        found.push(Cand {
                            image: img,
                            b: [
                                ((2.0 * bx + 1.0) / s).floor(),
                                ((2.0 * by + 1.0) / s).floor(),
                                ((2.0 * bx + 12.0) / s).floor(),
                                ((2.0 * by + 12.0) / s).floor(),
                            ],
                            score: p,
                            reg: [r(0), r(1), r(2), r(3)],
                        });
                    }
                }
                cands.extend(nms(found, 0.5, Overlap::Union));
            }
        }
        let cands = nms_per_image(cands, n, 0.7, Overlap::Union);
        let cands: Vec<Cand> = cands
            .into_iter()
            .map(|c| {
                let (bw, bh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
                Cand {
                    b: rerec([
                        c.b[0] + c.reg[0] * bw,
                        c.b[1] + c.reg[1] * bh,
                        c.b[2] + c.reg[2] * bw,
                        c.b[3] + c.reg[3] * bh,
                    ]),
                    ..c
                }
            })
            .collect();

        // Stage 2: R-Net on 24x24 crops; NMS 0.7; calibrate; square.
        let (cands, out) = self.run_net(frames, cands, 24, |x, n| match &self.host {
            Some(h) => {
                let (reg, prob) = h.rnet(&x, n);
                vec![reg, prob]
            }
            None => {
                let (reg, prob) = self.nets.rnet.forward(self.nchw(x, n, 24, 24));
                vec![host(reg), host(prob)]
            }
        });
        let mut next = Vec::new();
        for (c, o) in cands.into_iter().zip(out) {
            let score = o[1][1];
            if score > t2 {
                next.push(Cand {
                    score,
                    reg: [o[0][0], o[0][1], o[0][2], o[0][3]],
                    ..c
                });
            }
        }
        let cands: Vec<Cand> = nms_per_image(next, n, 0.7, Overlap::Union)
            .into_iter()
            .map(|c| Cand {
                b: rerec(bbreg(c.b, c.reg)),
                ..c
            })
            .collect();

        // Stage 3: O-Net on 48x48 crops: scores, landmarks, calibrated boxes; NMS "Min" 0.7.
        let (cands, out) = self.run_net(frames, cands, 48, |x, n| match &self.host {
            Some(h) => {
                let (reg, lm, prob) = h.onet(&x, n);
                vec![reg, lm, prob]
            }
            None => {
                let (reg, lm, prob) = self.nets.onet.forward(self.nchw(x, n, 48, 48));
                vec![host(reg), host(lm), host(prob)]
            }
        });
        let mut faces: Vec<(usize, Face)> = Vec::new();
        for (c, o) in cands.into_iter().zip(out) {
            let score = o[2][1];
            if score <= t3 {
                continue;
            }
            let (bw, bh) = (c.b[2] - c.b[0] + 1.0, c.b[3] - c.b[1] + 1.0);
            let mut landmarks = [[0f32; 2]; 5];
            for (k, l) in landmarks.iter_mut().enumerate() {
                *l = [bw * o[1][k] + c.b[0] - 1.0, bh * o[1][k + 5] + c.b[1] - 1.0];
            }
            let reg = [o[0][0], o[0][1], o[0][2], o[0][3]];
            faces.push((
                c.image,
                Face {
                    bbox: bbreg(c.b, reg),
                    score,
                    landmarks,
                },
            ));
        }
        let mut per_image = vec![Vec::new(); n];
        for (img, f) in faces {
            per_image[img].push(f);
        }
        per_image
            .into_iter()
            .map(|faces| {
                let as_cands: Vec<Cand> = faces
                    .iter()
                    .enumerate()
                    .map(|(i, f)| Cand {
                        image: i,
                        b: f.bbox,
                        score: f.score,
                        reg: [0.0; 4],
                    })
                    .collect();
                nms(as_cands, 0.7, Overlap::Min)
                    .into_iter()
                    .map(|c| faces[c.image])
                    .collect()
            })
            .collect()
    }

    /// Crop each candidate (clamped to the frame, as facenet-pytorch's `pad`), resize to
    /// `size` x `size` by area averaging, and run `net` in chunks. Returns the candidates that
    /// had a non-empty crop and, for each, the rows of every network output.
    #[allow(clippy::type_complexity)]
    fn run_net(
        &self,
        frames: &[&Frame],
        cands: Vec<Cand>,
        size: usize,
        net: impl Fn(Vec<f32>, usize) -> Vec<Vec<f32>>,
    ) -> (Vec<Cand>, Vec<Vec<Vec<f32>>>) {
        let (w, h) = (frames[0].width as i64, frames[0].height as i64);
        let kept: Vec<(Cand, [usize; 4])> = cands
            .into_iter()
            .filter_map(|c| {
                let x = (c.b[0].trunc() as i64).max(1);
                let y = (c.b[1].trunc() as i64).max(1);
                let ex = (c.b[2].trunc() as i64).min(w);
                let ey = (c.b[3].trunc() as i64).min(h);
                (ex > x - 1 && ey > y - 1 && x - 1 < w && y - 1 < h).then(|| {
                    (
                        c,
                        [(x - 1) as usize, (y - 1) as usize, ex as usize, ey as usize],
                    )
                })
            })
            .collect();
        let mut outs = Vec::with_capacity(kept.len());
        for chunk in kept.chunks(NET_BATCH) {
            let data: Vec<f32> = chunk
                .par_iter()
                .flat_map_iter(|(c, r)| area_resize(frames[c.image], *r, size, size))
                .collect();
            let res = net(data, chunk.len());
            for i in 0..chunk.len() {
                outs.push(
                    res.iter()
                        .map(|o| {
                            let cols = o.len() / chunk.len();
                            o[i * cols..(i + 1) * cols].to_vec()
                        })
                        .collect(),
                );
            }
        }
        (kept.into_iter().map(|(c, _)| c).collect(), outs)
    }
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // The nets output float tensors of the backend's float type; conversion cannot fail.
    crate::model::load::to_f32_vec(t)
}

/// Region `[x0, y0, x1, y1)` of an RGB frame -> `[oh, ow, 3]` by area averaging (PyTorch's
/// `interpolate(mode="area")`, i.e. adaptive average pooling), scaled as MTCNN expects:
/// (v - 127.5) / 128.
pub fn area_resize(f: &Frame, region: [usize; 4], oh: usize, ow: usize) -> Vec<f32> {
    let [x0, y0, x1, y1] = region;
    let (rw, rh) = (x1 - x0, y1 - y0);
    let span = |i: usize, inp: usize, out: usize| (i * inp / out, ((i + 1) * inp).div_ceil(out));
    let cols: Vec<(usize, usize)> = (0..ow).map(|j| span(j, rw, ow)).collect();
    // Horizontal pass on the rows used: [rh, ow, 3] sums divided by the window width.
    let mut tmp = vec![0f32; rh * ow * 3];
    for y in 0..rh {
        let row = &f.data[((y0 + y) * f.width + x0) * 3..((y0 + y) * f.width + x1) * 3];
        for (j, &(a, b)) in cols.iter().enumerate() {
            let mut s = [0f32; 3];
            for px in row[a * 3..b * 3].chunks_exact(3) {
                s[0] += px[0] as f32;
                s[1] += px[1] as f32;
                s[2] += px[2] as f32;
            }
            let inv = 1.0 / (b - a) as f32;
            for c in 0..3 {
                tmp[(y * ow + j) * 3 + c] = s[c] * inv;
            }
        }
    }
    let mut out = vec![0f32; oh * ow * 3];
    for i in 0..oh {
        let (a, b) = span(i, rh, oh);
        let inv = 1.0 / (b - a) as f32;
        let dst = &mut out[i * ow * 3..(i + 1) * ow * 3];
        for y in a..b {
            for (d, &v) in dst.iter_mut().zip(&tmp[y * ow * 3..(y + 1) * ow * 3]) {
                *d += v;
            }
        }
        for d in dst.iter_mut() {
            *d = (*d * inv - 127.5) * 0.0078125;
        }
    }
    out
}

/// Square a box around its centre with side max(w, h) (facenet-pytorch's `rerec`).
fn rerec(b: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let l = w.max(h);
    let x1 = b[0] + w * 0.5 - l * 0.5;
    let y1 = b[1] + h * 0.5 - l * 0.5;
    [x1, y1, x1 + l, y1 + l]
}

/// Apply a box regression (offsets relative to the inclusive box size).
fn bbreg(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    [
        b[0] + reg[0] * w,
        b[1] + reg[1] * h,
        b[2] + reg[2] * w,
        b[3] + reg[3] * h,
    ]
}

#[derive(Clone, Copy, PartialEq)]
enum Overlap {
    /// torchvision's `nms`: intersection over union, areas without +1.
    Union,
    /// facenet-pytorch's numpy "Min": intersection over the smaller area, areas with +1.
    Min,
}

/// Greedy non-maximum suppression, best score first; a box goes when its overlap with a kept
/// box exceeds `thresh`.
fn nms(mut c: Vec<Cand>, thresh: f32, how: Overlap) -> Vec<Cand> {
    // Equal scores are common: O-Net's probabilities saturate at 1.0 in f32 on real faces.
    // facenet-pytorch's last NMS ("Min", in numpy) walks `np.argsort(scores)` from its end. With
    // a stable sort, of equal scores the later candidate wins, and so it does here; numpy's
    // default sort is not stable where it uses the CPU's SIMD sort (AVX-512), so the peer's own
    // pick among equal scores depends on the machine. Its other NMS steps ("Union",
    // torchvision) sort stably in descending order: the earlier one wins. A stable sort of the
    // reversed list gives the former.
    if how == Overlap::Min {
        c.reverse();
    }
    c.sort_by(|a, b| b.score.total_cmp(&a.score));
    let one = if how == Overlap::Min { 1.0 } else { 0.0 };
    let area = |b: &[f32; 4]| (b[2] - b[0] + one) * (b[3] - b[1] + one);
    let mut keep: Vec<Cand> = Vec::new();
    'next: for cand in c {
        for k in &keep {
            let w = (cand.b[2].min(k.b[2]) - cand.b[0].max(k.b[0]) + one).max(0.0);
            let h = (cand.b[3].min(k.b[3]) - cand.b[1].max(k.b[1]) + one).max(0.0);
            let inter = w * h;
            let o = match how {
                Overlap::Union => inter / (area(&cand.b) + area(&k.b) - inter),
                Overlap::Min => inter / area(&cand.b).min(area(&k.b)),
            };
            if o > thresh {
                continue 'next;
            }
        }
        keep.push(cand);
    }
    keep
}

fn nms_per_image(c: Vec<Cand>, n: usize, thresh: f32, how: Overlap) -> Vec<Cand> {
    let mut per = vec![Vec::new(); n];
    for x in c {
        per[x.image].push(x);
    }
    per.into_iter().flat_map(|v| nms(v, thresh, how)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_blocks() {
        // 4x2 frame, channel value = x * 10 + y; halve the width.
        let mut data = Vec::new();
        for y in 0..2 {
            for x in 0..4 {
                let v = (x * 10 + y) as u8;
                data.extend([v, v, v]);
            }
        }
        let f = Frame {
            width: 4,
            height: 2,
            data,
        };
        let out = area_resize(&f, [0, 0, 4, 2], 1, 2);
        let back: Vec<f32> = out.iter().map(|v| v / 0.0078125 + 127.5).collect();
        // Columns {0,1} and {2,3}, rows {0,1}: means 5.5 and 25.5 (HWC: pixel 1 at index 3).
        assert!(
            (back[0] - 5.5).abs() < 1e-4 && (back[3] - 25.5).abs() < 1e-4,
            "{back:?}"
        );
    }

    #[test]
    fn nms_union_and_min() {
        let c = |x: f32, s: f32| Cand {
            image: 0,
            b: [x, 0.0, x + 10.0, 10.0],
            score: s,
            reg: [0.0; 4],
        };
        // IoU of boxes offset by 2 is 8/12 = 0.67: kept at 0.7, dropped at 0.5.
        assert_eq!(
            nms(vec![c(0.0, 0.9), c(2.0, 0.8)], 0.7, Overlap::Union).len(),
            2
        );
        let kept = nms(vec![c(2.0, 0.8), c(0.0, 0.9)], 0.5, Overlap::Union);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].score, 0.9);
        // A box inside another: "Min" overlap 1.
        let inner = Cand {
            b: [2.0, 2.0, 5.0, 5.0],
            ..c(0.0, 0.5)
        };
        assert_eq!(nms(vec![c(0.0, 0.9), inner], 0.7, Overlap::Min).len(), 1);
        assert!(
            (iou(&[0.0, 0.0, 10.0, 10.0], &[2.0, 0.0, 12.0, 10.0]) - 80.0 / 120.0).abs() < 1e-6
        );
    }
}
