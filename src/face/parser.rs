//! The dense face parser: LaPa label maps of face crops from MediaPipe's 468-point face mesh
//! ([`super::mesh`]) and its selfie person mask ([`super::selfie`]), the parser `marlin
//! prepare` uses by default (the 5-point layout of [`super::parsing`] stays as `--parser
//! template`).
//!
//! For each face: the mesh runs on a square region of the frame 1.5 times the face's size,
//! turned so the eyes are level (from the detector's 5 points where there are any), then a
//! second time on the region its own first landmarks give, as MediaPipe tracks a face from
//! frame to frame. The landmarks, mapped into the crop, are filled as the mesh's region
//! polygons: the face oval (skin), brows, eyes, nose, upper lip, inner mouth and lower lip.
//! Hair is where the person mask is on, outside the face oval, above the mouth, and not of the
//! face's skin colour (a high forehead above the oval stays skin). Background elsewhere.
//!
//! Labels (LaPa, as [`crate::masking`] reads them): 0 background, 1 skin, 2 / 3 brow, 4 / 5
//! eye (2 and 4 on the image's left, the person's right), 6 nose, 7 upper lip, 8 inner mouth,
//! 9 lower lip, 10 hair.

use super::cpu_parser::{HostMesh, HostSelfie, Img};
use super::crop::{crop_resize, CropBox};
use super::detect::Face;
use super::mesh::{FaceMesh, MESH_POINTS, MESH_SIZE};
use super::selfie::{SelfieSegmentation, SELFIE_SIZE};
use crate::masking::ParsingMap;
use crate::model::load::{to_f32_vec, Loader};
use crate::model::weights::{read_safetensors_bytes, StateDict, WeightsError};
use crate::video::Frame;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Arc;

/// The embedded weights (1.4 MB, float16): `mesh.*` and `selfie.*`, converted from the
/// `mediapipe` 0.10.14 wheel by `tools/convert_mediapipe_weights.py` (Apache 2.0,
/// `LICENSES/mediapipe-Apache-2.0.md`).
pub const WEIGHTS: &[u8] = include_bytes!("../../assets/face_parser.safetensors");

/// Region contours of the mesh, as ordered point indices (MediaPipe's `face_mesh_connections`,
/// Apache 2.0, chained into paths). "Right" and "left" are the person's: the person's right eye
/// is on the image's left.
pub mod regions {
    pub const FACE_OVAL: [usize; 36] = [
        10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
        152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
    ];
    pub const LIPS_OUTER_UPPER: [usize; 11] = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291];
    pub const LIPS_OUTER_LOWER: [usize; 11] = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291];
    pub const LIPS_INNER_UPPER: [usize; 11] = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308];
    pub const LIPS_INNER_LOWER: [usize; 11] = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308];
    pub const RIGHT_EYE_UPPER: [usize; 9] = [33, 246, 161, 160, 159, 158, 157, 173, 133];
    pub const RIGHT_EYE_LOWER: [usize; 9] = [33, 7, 163, 144, 145, 153, 154, 155, 133];
    pub const LEFT_EYE_UPPER: [usize; 9] = [263, 466, 388, 387, 386, 385, 384, 398, 362];
    pub const LEFT_EYE_LOWER: [usize; 9] = [263, 249, 390, 373, 374, 380, 381, 382, 362];
    pub const RIGHT_BROW_A: [usize; 5] = [46, 53, 52, 65, 55];
    pub const RIGHT_BROW_B: [usize; 5] = [70, 63, 105, 66, 107];
    pub const LEFT_BROW_A: [usize; 5] = [276, 283, 282, 295, 285];
    pub const LEFT_BROW_B: [usize; 5] = [300, 293, 334, 296, 336];
    /// The bridge from between the eyes (MediaPipe's nose line starts higher, at 168 between
    /// the brows, where LaPa's nose does not) and the loop around the tip and the nostrils; the
    /// nose is their convex hull.
    pub const NOSE: [usize; 24] = [
        6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 294, 278, 344, 440, 275, 45, 220, 115,
        48, 64, 2,
    ];
    /// Outer corners of the eyes (the person's right, then left): the face's horizontal.
    pub const EYE_CORNERS: [usize; 2] = [33, 263];
    /// The middle of the mouth (inner upper lip).
    pub const MOUTH: usize = 13;
}

/// A square region of a frame, turned by `angle` (radians, the face's eye line against the
/// image's x axis), sampled to a network's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roi {
    /// Centre in frame pixels (continuous coordinates: pixel `i` covers `[i, i + 1)`).
    pub center: [f32; 2],
    pub side: f32,
    pub angle: f32,
}

impl Roi {
    /// A point of an `n` x `n` input of this region (continuous input pixels) in the frame.
    pub fn to_frame(&self, p: [f32; 2], n: usize) -> [f32; 2] {
        let lx = (p[0] / n as f32 - 0.5) * self.side;
        let ly = (p[1] / n as f32 - 0.5) * self.side;
        let (s, c) = self.angle.sin_cos();
        [
            self.center[0] + c * lx - s * ly,
            self.center[1] + s * lx + c * ly,
        ]
    }

    /// The region bilinearly sampled to `n` x `n`, RGB in [0, 1], channels first; zeros outside
    /// the frame.
    pub fn sample(&self, f: &Frame, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; 3 * n * n];
        let (w, h) = (f.width as i64, f.height as i64);
        let px = |x: i64, y: i64, c: usize| -> f32 {
            if x < 0 || y < 0 || x >= w || y >= h {
                0.0
            } else {
                f.data[((y * w + x) * 3) as usize + c] as f32
            }
        };
        for v in 0..n {
            for u in 0..n {
                let q = self.to_frame([u as f32 + 0.5, v as f32 + 0.5], n);
                let (fx, fy) = (q[0] - 0.5, q[1] - 0.5);
                let (x0, y0) = (fx.floor(), fy.floor());
                let (wx, wy) = (fx - x0, fy - y0);
                let (x0, y0) = (x0 as i64, y0 as i64);
                for c in 0..3 {
                    let top = px(x0, y0, c) * (1.0 - wx) + px(x0 + 1, y0, c) * wx;
                    let bot = px(x0, y0 + 1, c) * (1.0 - wx) + px(x0 + 1, y0 + 1, c) * wx;
                    out[(c * n + v) * n + u] = (top * (1.0 - wy) + bot * wy) / 255.0;
                }
            }
        }
        out
    }

    /// MediaPipe's region from landmarks (frame pixels): level with the eye corners, centred on
    /// the landmarks' box in the face's own axes, 1.5 times its longer side.
    pub fn from_landmarks(points: &[[f32; 2]]) -> Self {
        let [r, l] = regions::EYE_CORNERS.map(|i| points[i]);
        let angle = (l[1] - r[1]).atan2(l[0] - r[0]);
        let (s, c) = angle.sin_cos();
        // Into the face's axes (rotate by -angle), box there, centre back.
        let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
        for p in points {
            let q = [c * p[0] + s * p[1], -s * p[0] + c * p[1]];
            for k in 0..2 {
                lo[k] = lo[k].min(q[k]);
                hi[k] = hi[k].max(q[k]);
            }
        }
        let m = [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0];
        Self {
            center: [c * m[0] - s * m[1], s * m[0] + c * m[1]],
            side: 1.5 * (hi[0] - lo[0]).max(hi[1] - lo[1]),
            angle,
        }
    }
}

/// One face to parse: a frame, the crop the map is made for, and the detector's face (box and 5
/// landmarks, frame pixels) when this frame has its own detection.
#[derive(Debug, Clone, Copy)]
pub struct FaceInput<'a> {
    pub frame: &'a Frame,
    pub crop: CropBox,
    pub face: Option<Face>,
}

/// What the parser makes of one face.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The LaPa label map of the crop, `size` x `size`.
    pub map: ParsingMap,
    /// The 468 mesh points in crop pixels (x, y; z in the same scale, relative).
    pub landmarks: Vec<[f32; 3]>,
    /// The mesh's face-presence probability; below 0.5 the crop likely shows no face.
    pub face: f32,
}

/// Face mesh + person mask, weights embedded.
#[derive(Debug, Clone)]
pub struct FaceParser<B: Backend> {
    pub mesh: FaceMesh<B>,
    pub selfie: SelfieSegmentation<B>,
    /// The networks on the host for the default CPU backend (several times faster than its
    /// conv2d on these depthwise layers).
    host: Option<Arc<HostNets>>,
    device: B::Device,
}

struct HostNets {
    mesh: HostMesh,
    selfie: HostSelfie,
}

impl std::fmt::Debug for HostNets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostNets")
    }
}

/// Faces per network call.
const BATCH: usize = 16;

impl<B: Backend> FaceParser<B> {
    /// The networks with the embedded weights.
    pub fn embedded(device: &B::Device) -> Result<Self, WeightsError> {
        let source = "embedded assets/face_parser.safetensors";
        let sd = StateDict {
            tensors: read_safetensors_bytes(WEIGHTS, source)?,
            source: source.into(),
        };
        let l = Loader::new(&sd, device);
        let (mesh, selfie) = (FaceMesh::load(&l)?, SelfieSegmentation::load(&l)?);
        let host = (B::name(device) == "flex").then(|| {
            Arc::new(HostNets {
                mesh: HostMesh::new(&mesh),
                selfie: HostSelfie::new(&selfie),
            })
        });
        Ok(Self {
            mesh,
            selfie,
            host,
            device: device.clone(),
        })
    }

    /// The same parser running its networks through burn's ops only (tests compare the
    /// paths).
    pub fn without_host_nets(mut self) -> Self {
        self.host = None;
        self
    }

    fn input(&self, data: Vec<f32>, b: usize, n: usize) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(data, [b, 3, n, n]), &self.device)
    }

    /// The mesh on each region: (468 points in frame pixels with z in frame scale, face
    /// probability).
    pub fn landmarks(&self, items: &[(&Frame, Roi)]) -> Vec<(Vec<[f32; 3]>, f32)> {
        let n = MESH_SIZE;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let (points, logit): (Vec<f32>, Vec<f32>) = match &self.host {
                Some(h) => {
                    let per: Vec<(Vec<f32>, f32)> = chunk
                        .par_iter()
                        .map(|(f, r)| h.mesh.forward(&Img::from_chw(&r.sample(f, n), 3, n, n)))
                        .collect();
                    let logit = per.iter().map(|p| p.1).collect();
                    (per.into_iter().flat_map(|p| p.0).collect(), logit)
                }
                None => {
                    let data: Vec<f32> = chunk.iter().flat_map(|(f, r)| r.sample(f, n)).collect();
                    let (points, logit) = self.mesh.forward(self.input(data, chunk.len(), n));
                    (to_f32_vec(points), to_f32_vec(logit))
                }
            };
            for (k, (_, roi)) in chunk.iter().enumerate() {
                let scale = roi.side / n as f32;
                let pts = (0..MESH_POINTS)
                    .map(|i| {
                        let p = &points[(k * MESH_POINTS + i) * 3..][..3];
                        let q = roi.to_frame([p[0], p[1]], n);
                        [q[0], q[1], p[2] * scale]
                    })
                    .collect();
                out.push((pts, 1.0 / (1.0 + (-logit[k]).exp())));
            }
        }
        out
    }

    /// The person mask of each region, `SELFIE_SIZE` x `SELFIE_SIZE` probabilities.
    pub fn person(&self, items: &[(&Frame, Roi)]) -> Vec<Vec<f32>> {
        let n = SELFIE_SIZE;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            if let Some(h) = &self.host {
                out.par_extend(
                    chunk
                        .par_iter()
                        .map(|(f, r)| h.selfie.forward(&Img::from_chw(&r.sample(f, n), 3, n, n))),
                );
                continue;
            }
            let data: Vec<f32> = chunk.iter().flat_map(|(f, r)| r.sample(f, n)).collect();
            let mask = to_f32_vec(self.selfie.forward(self.input(data, chunk.len(), n)));
            out.extend(mask.chunks(n * n).map(<[f32]>::to_vec));
        }
        out
    }

    /// Parse each face into a `size` x `size` LaPa map of its crop.
    pub fn parse(&self, faces: &[FaceInput], size: usize) -> Vec<Parsed> {
        let found = self.track(faces);
        let points: Vec<&[[f32; 3]]> = found.iter().map(|(p, _)| p.as_slice()).collect();
        self.label(faces, &points, size)
            .into_iter()
            .zip(found)
            .map(|((map, landmarks), (_, face))| Parsed {
                map,
                landmarks,
                face,
            })
            .collect()
    }

    /// The mesh's landmarks of each face (frame pixels, z in frame scale) and its face
    /// probability: a first pass on the detector's region (1.5x the face box, eyes level), a
    /// second on the region the first landmarks give.
    pub fn track(&self, faces: &[FaceInput]) -> Vec<(Vec<[f32; 3]>, f32)> {
        let first: Vec<(&Frame, Roi)> = faces
            .iter()
            .map(|f| (f.frame, detection_roi(&f.crop, f.face.as_ref())))
            .collect();
        let coarse = self.landmarks(&first);
        let second: Vec<(&Frame, Roi)> = faces
            .iter()
            .zip(&coarse)
            .map(|(f, (pts, _))| {
                let flat: Vec<[f32; 2]> = pts.iter().map(|p| [p[0], p[1]]).collect();
                (f.frame, Roi::from_landmarks(&flat))
            })
            .collect();
        self.landmarks(&second)
    }

    /// The label map of each face's crop from its landmarks (frame pixels, as [`Self::track`]
    /// gives them, possibly smoothed over frames) and the person mask, with the landmarks in
    /// crop pixels.
    pub fn label(
        &self,
        faces: &[FaceInput],
        points: &[&[[f32; 3]]],
        size: usize,
    ) -> Vec<(ParsingMap, Vec<[f32; 3]>)> {
        // The person mask of a region twice the crop, upright, around the crop's centre.
        let wide: Vec<(&Frame, Roi)> = faces
            .iter()
            .map(|f| {
                let c = crop_center(&f.crop);
                let roi = Roi {
                    center: c,
                    side: 2.0 * f.crop.side as f32,
                    angle: 0.0,
                };
                (f.frame, roi)
            })
            .collect();
        let person = self.person(&wide);
        faces
            .par_iter()
            .zip(points)
            .zip(person.par_iter().zip(&wide))
            .map(|((f, pts), (mask, (_, roi)))| {
                let s = size as f32 / f.crop.side as f32;
                let landmarks: Vec<[f32; 3]> = pts
                    .iter()
                    .map(|p| {
                        let q = f.crop.to_crop([p[0], p[1]], size);
                        [q[0], q[1], p[2] * s]
                    })
                    .collect();
                let crop = crop_resize(f.frame, &f.crop, size);
                let person = PersonMask {
                    mask,
                    roi,
                    crop: f.crop,
                    size,
                };
                (label_map(&landmarks, &crop, &person), landmarks)
            })
            .collect()
    }
}

/// Each frame's landmarks averaged over the frames with landmarks among `window` consecutive
/// frames centred on it (the window shrinks at the ends), as the face boxes are smoothed
/// ([`super::track::smooth`]); frames without landmarks stay without. `window` <= 1: unchanged.
pub fn smooth_landmarks(
    seq: &[Option<Vec<[f32; 3]>>],
    window: usize,
) -> Vec<Option<Vec<[f32; 3]>>> {
    if window <= 1 {
        return seq.to_vec();
    }
    let half = window / 2;
    (0..seq.len())
        .map(|i| {
            let own = seq[i].as_ref()?;
            let near: Vec<&Vec<[f32; 3]>> = seq
                [i.saturating_sub(half)..(i + half + 1).min(seq.len())]
                .iter()
                .flatten()
                .collect();
            let n = near.len() as f32;
            Some(
                (0..own.len())
                    .map(|k| {
                        let mut m = [0f32; 3];
                        for p in &near {
                            for c in 0..3 {
                                m[c] += p[k][c] / n;
                            }
                        }
                        m
                    })
                    .collect(),
            )
        })
        .collect()
}

fn crop_center(c: &CropBox) -> [f32; 2] {
    let h = c.side as f32 / 2.0;
    [c.x0 as f32 + h, c.y0 as f32 + h]
}

/// The first pass's region, as MediaPipe makes it from a detection: the face box's centre, 1.5
/// times its longer side, level with the detected eyes. Without a detection, the crop upright.
pub fn detection_roi(crop: &CropBox, face: Option<&Face>) -> Roi {
    match face {
        Some(f) => {
            let [l, r] = [f.landmarks[0], f.landmarks[1]];
            Roi {
                center: [(f.bbox[0] + f.bbox[2]) / 2.0, (f.bbox[1] + f.bbox[3]) / 2.0],
                side: 1.5 * f.width().max(f.height()),
                angle: (r[1] - l[1]).atan2(r[0] - l[0]),
            }
        }
        None => Roi {
            center: crop_center(crop),
            side: 1.5 * crop.side as f32,
            angle: 0.0,
        },
    }
}

/// The person mask of a frame region, read at crop pixels.
struct PersonMask<'a> {
    mask: &'a [f32],
    roi: &'a Roi,
    crop: CropBox,
    size: usize,
}

impl PersonMask<'_> {
    /// Person probability at crop pixel `(x, y)` (nearest mask cell).
    fn at(&self, x: usize, y: usize) -> f32 {
        let k = self.crop.side as f32 / self.size as f32;
        let fx = self.crop.x0 as f32 + (x as f32 + 0.5) * k - self.roi.center[0];
        let fy = self.crop.y0 as f32 + (y as f32 + 0.5) * k - self.roi.center[1];
        let (s, c) = self.roi.angle.sin_cos();
        let n = SELFIE_SIZE as f32;
        let u = ((c * fx + s * fy) / self.roi.side + 0.5) * n;
        let v = ((-s * fx + c * fy) / self.roi.side + 0.5) * n;
        if u < 0.0 || v < 0.0 || u >= n || v >= n {
            return 0.0;
        }
        self.mask[v as usize * SELFIE_SIZE + u as usize]
    }
}

/// A polygon in crop pixels with its bounding box.
struct Polygon {
    pts: Vec<[f32; 2]>,
    lo: [f32; 2],
    hi: [f32; 2],
}

impl Polygon {
    fn new(pts: Vec<[f32; 2]>) -> Self {
        let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
        for p in &pts {
            for k in 0..2 {
                lo[k] = lo[k].min(p[k]);
                hi[k] = hi[k].max(p[k]);
            }
        }
        Self { pts, lo, hi }
    }

    /// Inside (even-odd rule), or within `near` pixels of an edge: a closed eye is a thin line
    /// that still has its label.
    fn covers(&self, p: [f32; 2], near: f32) -> bool {
        if p[0] < self.lo[0] - near
            || p[1] < self.lo[1] - near
            || p[0] > self.hi[0] + near
            || p[1] > self.hi[1] + near
        {
            return false;
        }
        let n = self.pts.len();
        let mut inside = false;
        for i in 0..n {
            let (a, b) = (self.pts[i], self.pts[(i + 1) % n]);
            if (a[1] > p[1]) != (b[1] > p[1]) {
                let x = a[0] + (p[1] - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
                if p[0] < x {
                    inside = !inside;
                }
            }
            if near > 0.0 && segment_distance(p, a, b) <= near {
                return true;
            }
        }
        inside
    }
}

fn segment_distance(p: [f32; 2], a: [f32; 2], b: [f32; 2]) -> f32 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (ex, ey) = (a[0] + t * dx - p[0], a[1] + t * dy - p[1]);
    (ex * ex + ey * ey).sqrt()
}

/// Convex hull (Andrew's monotone chain), counter-clockwise.
fn convex_hull(mut pts: Vec<[f32; 2]>) -> Vec<[f32; 2]> {
    pts.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    let cross = |o: [f32; 2], a: [f32; 2], b: [f32; 2]| {
        (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    };
    let mut hull: Vec<[f32; 2]> = Vec::with_capacity(2 * pts.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &[f32; 2]>> = if pass == 0 {
            Box::new(pts.iter())
        } else {
            Box::new(pts.iter().rev())
        };
        for &p in iter {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0
            {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    hull
}

/// The LaPa label map of a crop from its mesh points (crop pixels), its pixels and the person
/// mask.
fn label_map(points: &[[f32; 3]], crop: &Frame, person: &PersonMask) -> ParsingMap {
    use regions::*;
    let size = crop.width;
    let at = |i: usize| [points[i][0], points[i][1]];
    let path = |idx: &[usize]| idx.iter().map(|&i| at(i)).collect::<Vec<_>>();
    let ring = |a: &[usize], b: &[usize]| {
        let mut p = path(a);
        p.extend(b.iter().rev().map(|&i| at(i)));
        Polygon::new(p)
    };
    let oval = Polygon::new(path(&FACE_OVAL));
    // Painted in order, later over earlier.
    let parts: [(Polygon, u8, f32); 9] = [
        (Polygon::new(convex_hull(path(&NOSE))), 6, 0.0),
        (ring(&RIGHT_BROW_A, &RIGHT_BROW_B), 2, 0.5),
        (ring(&LEFT_BROW_A, &LEFT_BROW_B), 3, 0.5),
        (ring(&RIGHT_EYE_UPPER, &RIGHT_EYE_LOWER), 4, 0.5),
        (ring(&LEFT_EYE_UPPER, &LEFT_EYE_LOWER), 5, 0.5),
        (ring(&LIPS_OUTER_UPPER, &LIPS_INNER_UPPER), 7, 0.0),
        (ring(&LIPS_OUTER_LOWER, &LIPS_INNER_LOWER), 9, 0.0),
        (ring(&LIPS_INNER_UPPER, &LIPS_INNER_LOWER), 8, 0.0),
        // The inner mouth again, so the lips never cover it.
        (ring(&LIPS_INNER_UPPER, &LIPS_INNER_LOWER), 8, 0.0),
    ];
    // The face's axes: x along the eye corners, y down; the mouth's height in them. Hair is
    // looked for above it: lower down, the person mask is mostly beard, neck and shoulders.
    let [r, l] = EYE_CORNERS.map(at);
    let (s, c) = (l[1] - r[1]).atan2(l[0] - r[0]).sin_cos();
    let down = |p: [f32; 2]| -s * p[0] + c * p[1];
    let mouth = down(at(MOUTH));
    let mut labels = vec![0u8; size * size];
    for y in 0..size {
        for x in 0..size {
            let p = [x as f32 + 0.5, y as f32 + 0.5];
            let mut label = 0;
            if oval.covers(p, 0.0) {
                label = 1;
            } else if down(p) < mouth && person.at(x, y) > 0.5 {
                label = 10;
            }
            for (poly, l, near) in &parts {
                if poly.covers(p, *near) {
                    label = *l;
                }
            }
            labels[y * size + x] = label;
        }
    }
    skin_above_oval(&mut labels, crop);
    ParsingMap {
        width: size,
        height: size,
        labels,
    }
}

/// Hair pixels of the face's skin colour that touch skin (a forehead above the mesh's oval, the
/// ears) become skin: grown from the skin outwards, one ring at a time.
fn skin_above_oval(labels: &mut [u8], crop: &Frame) {
    let size = crop.width;
    // Colour features: red-green and green-blue (skin is warm, grey or dark hair is not) and
    // brightness.
    let feat = |i: usize| {
        let o = i * 3;
        let [r, g, b] = [0, 1, 2].map(|k| crop.data[o + k] as f32);
        [r - g, g - b, (r + g + b) / 3.0]
    };
    // Skin colour: mean and spread of the pixels labelled skin.
    let skin: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 1).collect();
    if skin.len() < 64 {
        return;
    }
    let n = skin.len() as f32;
    let mut mean = [0f32; 3];
    for &i in &skin {
        let c = feat(i);
        for k in 0..3 {
            mean[k] += c[k] / n;
        }
    }
    let mut var = [0f32; 3];
    for &i in &skin {
        let c = feat(i);
        for k in 0..3 {
            var[k] += (c[k] - mean[k]).powi(2) / n;
        }
    }
    let sd = [0, 1, 2].map(|k| var[k].sqrt().max([4.0, 4.0, 10.0][k]));
    let like_skin = |i: usize| {
        let c = feat(i);
        // Colour within 2 spreads, brightness within 3 (a lit forehead is brighter).
        (0..3).all(|k| ((c[k] - mean[k]) / sd[k]).abs() <= [2.0, 2.0, 3.0][k])
    };
    let mut frontier: Vec<usize> = skin;
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for i in frontier {
            let (x, y) = (i % size, i / size);
            let around = [
                (x > 0).then(|| i - 1),
                (x + 1 < size).then(|| i + 1),
                (y > 0).then(|| i - size),
                (y + 1 < size).then(|| i + size),
            ];
            for j in around.into_iter().flatten() {
                if labels[j] == 10 && like_skin(j) {
                    labels[j] = 1;
                    next.push(j);
                }
            }
        }
        frontier = next;
    }
}

/// Which parser makes the label maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParserKind {
    /// The 468-point face mesh and the person mask ([`FaceParser`]).
    #[default]
    Mesh,
    /// A canonical layout fitted to the detector's 5 points ([`super::parsing`]).
    Template,
}

impl ParserKind {
    pub const NAMES: [&'static str; 2] = ["mesh", "template"];
}

impl std::str::FromStr for ParserKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mesh" => Ok(Self::Mesh),
            "template" => Ok(Self::Template),
            _ => Err(format!("unknown parser '{s}' (mesh or template)")),
        }
    }
}

/// A parser ready to run: the mesh networks, or the 5-point template.
#[derive(Debug, Clone)]
pub enum Parsing<B: Backend> {
    Mesh(Box<FaceParser<B>>),
    Template,
}

impl<B: Backend> Parsing<B> {
    /// `kind`'s parser, its networks (if any) on `device`.
    pub fn new(kind: ParserKind, device: &B::Device) -> Result<Self, WeightsError> {
        Ok(match kind {
            ParserKind::Mesh => Self::Mesh(Box::new(FaceParser::embedded(device)?)),
            ParserKind::Template => Self::Template,
        })
    }

    /// The `size` x `size` label map of each face's crop; None where there is no face to parse
    /// (the template needs the frame's own 5 points, the mesh a face probability of 0.5).
    pub fn maps(&self, faces: &[FaceInput], size: usize) -> Vec<Option<ParsingMap>> {
        match self {
            Self::Mesh(p) => p
                .parse(faces, size)
                .into_iter()
                .map(|r| (r.face >= 0.5).then_some(r.map))
                .collect(),
            Self::Template => faces
                .iter()
                .map(|f| {
                    f.face.map(|face| {
                        super::parsing::parse_from_landmarks(
                            &face.landmarks.map(|p| f.crop.to_crop(p, size)),
                            size,
                        )
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roi_maps_its_corners_and_turns() {
        let r = Roi {
            center: [100.0, 50.0],
            side: 40.0,
            angle: std::f32::consts::FRAC_PI_2,
        };
        // The input's centre is the region's centre; its x axis points down the frame.
        assert_eq!(r.to_frame([96.0, 96.0], 192), [100.0, 50.0]);
        let p = r.to_frame([192.0, 96.0], 192);
        assert!(
            (p[0] - 100.0).abs() < 1e-4 && (p[1] - 70.0).abs() < 1e-4,
            "{p:?}"
        );
    }

    #[test]
    fn landmarks_smooth_over_the_frames_that_have_them() {
        let p = |v: f32| Some(vec![[v, 2.0 * v, 0.0]]);
        let seq = vec![p(0.0), p(3.0), None, p(6.0), p(9.0)];
        let s = smooth_landmarks(&seq, 3);
        // Frame 1 averages frames 0 and 1 (2 is empty); frame 3 averages 3 and 4; the empty
        // frame stays empty; the ends shrink the window.
        assert_eq!(s[0], p(1.5));
        assert_eq!(s[1], p(1.5));
        assert_eq!(s[2], None);
        assert_eq!(s[3], p(7.5));
        assert_eq!(s[4], p(7.5));
        assert_eq!(smooth_landmarks(&seq, 1), seq);
    }

    #[test]
    fn polygon_cover_and_hull() {
        let sq = Polygon::new(vec![[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]]);
        assert!(sq.covers([5.0, 5.0], 0.0));
        assert!(!sq.covers([11.0, 5.0], 0.0));
        assert!(sq.covers([10.4, 5.0], 0.5));
        let h = convex_hull(vec![
            [0.0, 0.0],
            [2.0, 0.0],
            [1.0, 1.0],
            [2.0, 2.0],
            [0.0, 2.0],
        ]);
        assert_eq!(h.len(), 4, "{h:?}");
    }
}
