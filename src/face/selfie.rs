//! MediaPipe's selfie-segmentation network (a MobileNetV3-style encoder and a gated
//! upsampling decoder): the probability that each pixel of a 256x256 image shows a person,
//! layer for layer as `selfie_segmentation.tflite` in the `mediapipe` 0.10.14 wheel (Apache
//! 2.0) computes it. Weights in `assets/face_parser.safetensors` (float16), layer names the
//! TFLite file's. The face parser takes hair from it: person, outside the face.
//!
//! Input: RGB in [0, 1], `[B, 3, 256, 256]`; output `[B, 256, 256]`.

use super::layers::{upsample2, Conv, Gate, Upconv};
use crate::model::load::Loader;
use crate::model::weights::WeightsError;
use burn::tensor::activation::{hard_swish, relu, sigmoid};
use burn::tensor::{backend::Backend, Tensor};

/// Input side of the network.
pub const SELFIE_SIZE: usize = 256;

/// An inverted bottleneck: 1x1 expansion, depthwise k x k (stride 1 or 2), optional
/// squeeze-excitation gate, 1x1 projection; residual when the shape is kept.
#[derive(Debug, Clone)]
pub(crate) struct Bottleneck<B: Backend> {
    pub(crate) expand: Conv<B>,
    pub(crate) depthwise: Conv<B>,
    pub(crate) gate: Option<Gate<B>>,
    pub(crate) project: Conv<B>,
    /// hard-swish (else ReLU) after the expansion and the depthwise convolution.
    pub(crate) hswish: bool,
    pub(crate) residual: bool,
}

impl<B: Backend> Bottleneck<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let act = |t: Tensor<B, 4>| if self.hswish { hard_swish(t) } else { relu(t) };
        let mut y = act(self.depthwise.forward(act(self.expand.forward(x.clone()))));
        if let Some(g) = &self.gate {
            y = y.clone() * g.forward(y);
        }
        let y = self.project.forward(y);
        if self.residual {
            y + x
        } else {
            y
        }
    }
}

/// One decoder stage: upsample, 1x1 to the skip's width, a gated merge with the skip
/// (`skip * gate(skip + up) + up`), then `a + relu(depthwise(a))` with `a = relu(1x1(merge))`.
#[derive(Debug, Clone)]
pub(crate) struct Up<B: Backend> {
    pub(crate) narrow: Conv<B>,
    pub(crate) gate: Gate<B>,
    pub(crate) mix: Conv<B>,
    pub(crate) depthwise: Conv<B>,
}

impl<B: Backend> Up<B> {
    fn forward(&self, x: Tensor<B, 4>, skip: Tensor<B, 4>) -> Tensor<B, 4> {
        let up = self.narrow.forward(upsample2(x));
        let g = self.gate.forward(skip.clone() + up.clone());
        let merged = skip * g + up;
        let a = relu(self.mix.forward(merged));
        a.clone() + relu(self.depthwise.forward(a))
    }
}

/// The selfie-segmentation network.
#[derive(Debug, Clone)]
pub struct SelfieSegmentation<B: Backend> {
    pub(crate) stem: Conv<B>,
    /// 128 -> 64 (the 64x64 skip).
    pub(crate) stage1: Bottleneck<B>,
    /// 64 -> 32 (the 32x32 skip).
    pub(crate) stage2: Vec<Bottleneck<B>>,
    /// 32 -> 16.
    pub(crate) stage3: Vec<Bottleneck<B>>,
    /// 16x16 features gated by their own global context.
    pub(crate) context: Conv<B>,
    pub(crate) context_gate: Conv<B>,
    pub(crate) up32: Up<B>,
    pub(crate) up64: Up<B>,
    pub(crate) up128: Up<B>,
    pub(crate) segment: Upconv<B>,
}

impl<B: Backend> SelfieSegmentation<B> {
    pub fn load(l: &Loader<B>) -> Result<Self, WeightsError> {
        let conv = |n: usize| Conv::load(l, &format!("selfie.conv2d_{n}"), 1, false, false);
        // The file's first depthwise layer has no number.
        let dw = |n: usize, s: usize| {
            let name = match n {
                0 => "selfie.depthwise_conv2d".to_string(),
                n => format!("selfie.depthwise_conv2d_{n}"),
            };
            Conv::load(l, &name, s, true, true)
        };
        let gate = |a: usize, b: usize| {
            Gate::load(
                l,
                &format!("selfie.conv2d_{a}"),
                &format!("selfie.conv2d_{b}"),
            )
        };
        let stem_name = "selfie.conv2d";
        // (expand, depthwise, stride, gate convs, project, hswish, residual)
        let bottleneck = |e: usize,
                          d: usize,
                          s: usize,
                          g: Option<(usize, usize)>,
                          p: usize,
                          hs: bool,
                          res: bool|
         -> Result<Bottleneck<B>, WeightsError> {
            Ok(Bottleneck {
                expand: conv(e)?,
                depthwise: dw(d, s)?,
                gate: g.map(|(a, b)| gate(a, b)).transpose()?,
                project: conv(p)?,
                hswish: hs,
                residual: res,
            })
        };
        let up = |n: usize, g: (usize, usize), m: usize, d: usize| -> Result<Up<B>, WeightsError> {
            Ok(Up {
                narrow: conv(n)?,
                gate: gate(g.0, g.1)?,
                mix: conv(m)?,
                depthwise: dw(d, 1)?,
            })
        };
        Ok(Self {
            stem: Conv::load(l, stem_name, 2, false, true)?,
            stage1: bottleneck(1, 0, 2, Some((2, 3)), 4, false, false)?,
            stage2: vec![
                bottleneck(5, 1, 2, None, 6, false, false)?,
                bottleneck(7, 2, 1, None, 8, false, true)?,
            ],
            stage3: vec![
                bottleneck(9, 3, 2, Some((10, 11)), 12, true, false)?,
                bottleneck(13, 4, 1, Some((14, 15)), 16, true, true)?,
                bottleneck(17, 5, 1, Some((18, 19)), 20, true, true)?,
                bottleneck(21, 6, 1, Some((22, 23)), 24, true, true)?,
                bottleneck(25, 7, 1, Some((26, 27)), 28, true, true)?,
            ],
            context: conv(29)?,
            context_gate: conv(30)?,
            up32: up(31, (32, 33), 34, 8)?,
            up64: up(35, (36, 37), 38, 9)?,
            up128: up(39, (40, 41), 42, 10)?,
            segment: Upconv::load(l, "selfie.segment")?,
        })
    }

    /// `[B, 3, 256, 256]` in [0, 1] -> person probability `[B, 256, 256]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let s128 = hard_swish(self.stem.forward(x));
        let s64 = self.stage1.forward(s128.clone());
        let mut s32 = s64.clone();
        for b in &self.stage2 {
            s32 = b.forward(s32);
        }
        let mut x = s32.clone();
        for b in &self.stage3 {
            x = b.forward(x);
        }
        let g = sigmoid(
            self.context_gate
                .forward(super::layers::global_mean(x.clone())),
        );
        let x = relu(self.context.forward(x)) * g;
        let x = self.up32.forward(x, s32);
        let x = self.up64.forward(x, s64);
        let x = self.up128.forward(x, s128);
        let y = sigmoid(self.segment.forward(x));
        let [b, _, h, w] = y.dims();
        y.reshape([b, h, w])
    }
}
