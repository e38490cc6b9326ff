//! MTCNN's three cascaded networks (Zhang et al. 2016), layer for layer as facenet-pytorch 2.6
//! defines them, so its pretrained weights (MIT) load unchanged: `assets/mtcnn.safetensors`,
//! converted from the wheel by `tools/convert_mtcnn_weights.py` and embedded in the binary.
//!
//! Inputs are RGB images scaled to [-1, 1] as (x - 127.5) / 128, NCHW.

use crate::model::load::Loader;
use crate::model::weights::{read_safetensors_bytes, StateDict, WeightsError};
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{prelu, softmax};
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{backend::Backend, Tensor};

/// The embedded weights (1.9 MB, float32).
pub const WEIGHTS: &[u8] = include_bytes!("../../assets/mtcnn.safetensors");

/// A stride-1, unpadded 2-D convolution with bias.
#[derive(Module, Debug)]
pub struct Conv<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Conv<B> {
    fn load(l: &Loader<B>, prefix: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: l.param(&format!("{prefix}.weight"))?,
            bias: l.param(&format!("{prefix}.bias"))?,
        })
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::kernels::of::<B>().conv2d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        )
    }
}

fn alpha<B: Backend>(l: &Loader<B>, prefix: &str) -> Result<Param<Tensor<B, 1>>, WeightsError> {
    l.param(&format!("{prefix}.weight"))
}

/// Max pooling as facenet-pytorch's MaxPool2d(k, s, ceil_mode=True).
fn pool<B: Backend>(x: Tensor<B, 4>, k: usize, s: usize) -> Tensor<B, 4> {
    max_pool2d(x, [k, k], [s, s], [0, 0], [1, 1], true)
}

/// Flatten `[B, C, H, W]` in (W, H, C) order, as the reference's permute(0, 3, 2, 1).
/// A dense layer `[B, in] -> [B, out]` through the kernels (their precision: true f32 on CUDA).
fn dense<B: Backend>(l: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    crate::model::block::linear_rows(crate::kernels::of::<B>(), l, x)
}

fn flatten_whc<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [b, c, h, w] = x.dims();
    x.permute([0, 3, 2, 1]).reshape([b, w * h * c])
}

/// Proposal network: fully convolutional over the whole image (12x12 receptive field).
#[derive(Module, Debug)]
pub struct PNet<B: Backend> {
    pub(crate) conv1: Conv<B>,
    pub(crate) prelu1: Param<Tensor<B, 1>>,
    pub(crate) conv2: Conv<B>,
    pub(crate) prelu2: Param<Tensor<B, 1>>,
    pub(crate) conv3: Conv<B>,
    pub(crate) prelu3: Param<Tensor<B, 1>>,
    pub(crate) conv4_1: Conv<B>,
    pub(crate) conv4_2: Conv<B>,
}

impl<B: Backend> PNet<B> {
    /// `[B, 3, H, W]` -> (box regression `[B, 4, h, w]`, face probability `[B, 2, h, w]`).
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let x = pool(prelu(self.conv1.forward(x), self.prelu1.val()), 2, 2);
        let x = prelu(self.conv2.forward(x), self.prelu2.val());
        let x = prelu(self.conv3.forward(x), self.prelu3.val());
        let prob = softmax(self.conv4_1.forward(x.clone()), 1);
        (self.conv4_2.forward(x), prob)
    }
}

/// Refinement network on 24x24 candidate crops.
#[derive(Module, Debug)]
pub struct RNet<B: Backend> {
    pub(crate) conv1: Conv<B>,
    pub(crate) prelu1: Param<Tensor<B, 1>>,
    pub(crate) conv2: Conv<B>,
    pub(crate) prelu2: Param<Tensor<B, 1>>,
    pub(crate) conv3: Conv<B>,
    pub(crate) prelu3: Param<Tensor<B, 1>>,
    pub(crate) dense4: Linear<B>,
    pub(crate) prelu4: Param<Tensor<B, 1>>,
    pub(crate) dense5_1: Linear<B>,
    pub(crate) dense5_2: Linear<B>,
}

impl<B: Backend> RNet<B> {
    /// `[B, 3, 24, 24]` -> (box regression `[B, 4]`, face probability `[B, 2]`).
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let x = pool(prelu(self.conv1.forward(x), self.prelu1.val()), 3, 2);
        let x = pool(prelu(self.conv2.forward(x), self.prelu2.val()), 3, 2);
        let x = prelu(self.conv3.forward(x), self.prelu3.val());
        let x = prelu(dense(&self.dense4, flatten_whc(x)), self.prelu4.val());
        let prob = softmax(dense(&self.dense5_1, x.clone()), 1);
        (dense(&self.dense5_2, x), prob)
    }
}

/// Output network on 48x48 crops: boxes, 5 landmarks, probability.
#[derive(Module, Debug)]
pub struct ONet<B: Backend> {
    pub(crate) conv1: Conv<B>,
    pub(crate) prelu1: Param<Tensor<B, 1>>,
    pub(crate) conv2: Conv<B>,
    pub(crate) prelu2: Param<Tensor<B, 1>>,
    pub(crate) conv3: Conv<B>,
    pub(crate) prelu3: Param<Tensor<B, 1>>,
    pub(crate) conv4: Conv<B>,
    pub(crate) prelu4: Param<Tensor<B, 1>>,
    pub(crate) dense5: Linear<B>,
    pub(crate) prelu5: Param<Tensor<B, 1>>,
    pub(crate) dense6_1: Linear<B>,
    pub(crate) dense6_2: Linear<B>,
    pub(crate) dense6_3: Linear<B>,
}

impl<B: Backend> ONet<B> {
    /// `[B, 3, 48, 48]` -> (box regression `[B, 4]`, landmarks `[B, 10]` (5 x then 5 y,
    /// relative to the box), face probability `[B, 2]`).
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let x = pool(prelu(self.conv1.forward(x), self.prelu1.val()), 3, 2);
        let x = pool(prelu(self.conv2.forward(x), self.prelu2.val()), 3, 2);
        let x = pool(prelu(self.conv3.forward(x), self.prelu3.val()), 2, 2);
        let x = prelu(self.conv4.forward(x), self.prelu4.val());
        let x = prelu(dense(&self.dense5, flatten_whc(x)), self.prelu5.val());
        let prob = softmax(dense(&self.dense6_1, x.clone()), 1);
        (
            dense(&self.dense6_2, x.clone()),
            dense(&self.dense6_3, x),
            prob,
        )
    }
}

/// The three networks.
#[derive(Module, Debug)]
pub struct Mtcnn<B: Backend> {
    pub pnet: PNet<B>,
    pub rnet: RNet<B>,
    pub onet: ONet<B>,
}

impl<B: Backend> Mtcnn<B> {
    /// The networks with the embedded pretrained weights.
    pub fn embedded(device: &B::Device) -> Result<Self, WeightsError> {
        let source = "embedded assets/mtcnn.safetensors";
        let tensors = read_safetensors_bytes(WEIGHTS, source)?;
        let sd = StateDict {
            tensors,
            source: source.into(),
        };
        let l = Loader::new(&sd, device);
        let conv = |p: &str| Conv::load(&l, p);
        let a = |p: &str| alpha(&l, p);
        Ok(Self {
            pnet: PNet {
                conv1: conv("pnet.conv1")?,
                prelu1: a("pnet.prelu1")?,
                conv2: conv("pnet.conv2")?,
                prelu2: a("pnet.prelu2")?,
                conv3: conv("pnet.conv3")?,
                prelu3: a("pnet.prelu3")?,
                conv4_1: conv("pnet.conv4_1")?,
                conv4_2: conv("pnet.conv4_2")?,
            },
            rnet: RNet {
                conv1: conv("rnet.conv1")?,
                prelu1: a("rnet.prelu1")?,
                conv2: conv("rnet.conv2")?,
                prelu2: a("rnet.prelu2")?,
                conv3: conv("rnet.conv3")?,
                prelu3: a("rnet.prelu3")?,
                dense4: l.linear("rnet.dense4", true)?,
                prelu4: a("rnet.prelu4")?,
                dense5_1: l.linear("rnet.dense5_1", true)?,
                dense5_2: l.linear("rnet.dense5_2", true)?,
            },
            onet: ONet {
                conv1: conv("onet.conv1")?,
                prelu1: a("onet.prelu1")?,
                conv2: conv("onet.conv2")?,
                prelu2: a("onet.prelu2")?,
                conv3: conv("onet.conv3")?,
                prelu3: a("onet.prelu3")?,
                conv4: conv("onet.conv4")?,
                prelu4: a("onet.prelu4")?,
                dense5: l.linear("onet.dense5", true)?,
                prelu5: a("onet.prelu5")?,
                dense6_1: l.linear("onet.dense6_1", true)?,
                dense6_2: l.linear("onet.dense6_2", true)?,
                dense6_3: l.linear("onet.dense6_3", true)?,
            },
        })
    }
}
