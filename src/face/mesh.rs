//! MediaPipe's face-mesh network (Kartynnik et al. 2019, "Real-time Facial Surface Geometry
//! from Monocular Video on Mobile GPUs"): 468 3-D landmarks of a 192x192 face crop and a
//! face-presence score, layer for layer as `face_landmark.tflite` in the `mediapipe` 0.10.14
//! wheel (Apache 2.0) computes them. Weights: `assets/face_parser.safetensors` (float16, as in
//! the file), converted by `tools/convert_mediapipe_weights.py`, embedded in the binary. Layer
//! names are the TFLite file's.
//!
//! Input: RGB in [0, 1], `[B, 3, 192, 192]`. A residual block is
//! `prelu(pointwise(depthwise(x)) + shortcut(x))`, the shortcut a 2x2 max-pool and zero
//! channels appended when the block halves the size or widens the channels.

use super::layers::{Conv, PRelu};
use crate::model::load::Loader;
use crate::model::weights::WeightsError;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::PadMode;
use burn::tensor::{backend::Backend, Tensor};

/// Input side of the network.
pub const MESH_SIZE: usize = 192;
/// Landmarks per face.
pub const MESH_POINTS: usize = 468;

/// One residual block: depthwise 3x3 (stride 1 or 2), pointwise 1x1, shortcut, PReLU.
#[derive(Debug, Clone)]
pub struct Residual<B: Backend> {
    pub(crate) depthwise: Conv<B>,
    pub(crate) pointwise: Conv<B>,
    pub(crate) prelu: PRelu<B>,
}

impl<B: Backend> Residual<B> {
    fn load(
        l: &Loader<B>,
        dw: usize,
        pw: usize,
        pr: usize,
        stride: usize,
    ) -> Result<Self, WeightsError> {
        Ok(Self {
            depthwise: Conv::load(
                l,
                &format!("mesh.depthwise_conv2d_{dw}"),
                stride,
                true,
                true,
            )?,
            pointwise: Conv::load(l, &format!("mesh.conv2d_{pw}"), 1, false, false)?,
            prelu: PRelu::load(l, &format!("mesh.p_re_lu_{pr}"))?,
        })
    }

    /// `[B, C, H, W]` -> `[B, O, H / stride, W / stride]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.pointwise.forward(self.depthwise.forward(x.clone()));
        let mut short = x;
        if self.depthwise.stride == 2 {
            short = max_pool2d(short, [2, 2], [2, 2], [0, 0], [1, 1], false);
        }
        let (c, o) = (short.dims()[1], y.dims()[1]);
        if o > c {
            short = short.pad([(0, o - c), (0, 0), (0, 0)], PadMode::Constant(0.0));
        }
        self.prelu.forward(y + short)
    }
}

/// A head: blocks on the shared 6x6 features, a 1x1 narrowing to 32 channels, one more block,
/// and a 3x3 valid convolution to `[B, out, 1, 1]`.
#[derive(Debug, Clone)]
pub struct Head<B: Backend> {
    pub(crate) blocks: Vec<Residual<B>>,
    pub(crate) narrow: Conv<B>,
    pub(crate) narrow_prelu: PRelu<B>,
    pub(crate) last_block: Residual<B>,
    pub(crate) out: Conv<B>,
}

impl<B: Backend> Head<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for b in &self.blocks {
            x = b.forward(x);
        }
        let x = self.narrow_prelu.forward(self.narrow.forward(x));
        self.out.forward(self.last_block.forward(x))
    }
}

/// The face-mesh network.
#[derive(Debug, Clone)]
pub struct FaceMesh<B: Backend> {
    pub(crate) stem: Conv<B>,
    pub(crate) stem_prelu: PRelu<B>,
    /// 96x96 -> 6x6, widening 16 -> 128.
    pub(crate) trunk: Vec<Residual<B>>,
    /// 6x6 -> 3x3 -> 1404 values: 468 x (x, y, z) in input pixels.
    pub(crate) landmarks: Head<B>,
    /// 6x6 -> 3x3 -> one logit: is a face in the crop.
    pub(crate) presence: Head<B>,
}

impl<B: Backend> FaceMesh<B> {
    pub fn load(l: &Loader<B>) -> Result<Self, WeightsError> {
        // (depthwise, pointwise, prelu, stride) of the trunk's blocks, in order.
        const TRUNK: [(usize, usize, usize, usize); 14] = [
            (1, 2, 2, 1),
            (2, 3, 3, 1),
            (3, 4, 4, 2),
            (4, 5, 5, 1),
            (5, 6, 6, 1),
            (6, 7, 7, 2),
            (7, 8, 8, 1),
            (8, 9, 9, 1),
            (9, 10, 10, 2),
            (10, 11, 11, 1),
            (11, 12, 12, 1),
            (12, 13, 13, 2),
            (13, 14, 14, 1),
            (14, 15, 15, 1),
        ];
        let block =
            |(dw, pw, pr, s): (usize, usize, usize, usize)| Residual::load(l, dw, pw, pr, s);
        let conv =
            |n: usize, s: usize| Conv::load(l, &format!("mesh.conv2d_{n}"), s, false, n == 1);
        let prelu = |n: usize| PRelu::load(l, &format!("mesh.p_re_lu_{n}"));
        Ok(Self {
            stem: conv(1, 2)?,
            stem_prelu: prelu(1)?,
            trunk: TRUNK.into_iter().map(block).collect::<Result<_, _>>()?,
            landmarks: Head {
                blocks: vec![
                    block((15, 16, 16, 2))?,
                    block((16, 17, 17, 1))?,
                    block((17, 18, 18, 1))?,
                ],
                narrow: conv(19, 1)?,
                narrow_prelu: prelu(19)?,
                last_block: block((18, 20, 20, 1))?,
                out: conv(21, 3)?,
            },
            presence: Head {
                blocks: vec![block((23, 28, 26, 2))?],
                narrow: conv(29, 1)?,
                narrow_prelu: prelu(27)?,
                last_block: block((24, 30, 28, 1))?,
                out: conv(31, 3)?,
            },
        })
    }

    /// `[B, 3, 192, 192]` in [0, 1] -> (landmarks `[B, 468, 3]` in input pixels, face-presence
    /// logit `[B]`; the face probability is its sigmoid).
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, Tensor<B, 1>) {
        let b = x.dims()[0];
        let mut x = self.stem_prelu.forward(self.stem.forward(x));
        for block in &self.trunk {
            x = block.forward(x);
        }
        let points = self
            .landmarks
            .forward(x.clone())
            .reshape([b, MESH_POINTS, 3]);
        let face = self.presence.forward(x).reshape([b]);
        (points, face)
    }
}
