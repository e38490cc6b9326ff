//! The few layers MediaPipe's face-mesh and selfie-segmentation networks are made of, as
//! TensorFlow Lite computes them (NCHW here): convolutions with TensorFlow's `SAME` padding
//! (extra row/column after, not before, when the total is odd), PReLU, squeeze-excitation,
//! 2x bilinear upsampling with half-pixel centres, and the 2x2 stride-2 transposed convolution.

use crate::model::load::Loader;
use crate::model::weights::WeightsError;
use burn::tensor::activation::{prelu, relu, sigmoid};
use burn::tensor::module::conv_transpose2d;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, PadMode};
use burn::tensor::{backend::Backend, Tensor};

/// TensorFlow's `SAME` padding of one axis: `(before, after)`.
pub fn same_padding(size: usize, k: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + k).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// A 2-D convolution with bias: `[B, C, H, W]` -> `[B, O, H', W']`. Depthwise when `groups`
/// equals the channel count; `same` pads as TensorFlow does, otherwise no padding.
#[derive(Debug, Clone)]
pub struct Conv<B: Backend> {
    /// `[O, C / groups, k, k]`
    pub weight: Tensor<B, 4>,
    /// `[O]`
    pub bias: Tensor<B, 1>,
    pub stride: usize,
    pub groups: usize,
    pub same: bool,
}

impl<B: Backend> Conv<B> {
    /// A dense (`groups` 1) or depthwise (`depthwise`) convolution named `name` in `l`.
    pub fn load(
        l: &Loader<B>,
        name: &str,
        stride: usize,
        depthwise: bool,
        same: bool,
    ) -> Result<Self, WeightsError> {
        let weight: Tensor<B, 4> = l.tensor(&format!("{name}.weight"))?;
        let groups = if depthwise { weight.dims()[0] } else { 1 };
        Ok(Self {
            weight,
            bias: l.tensor(&format!("{name}.bias"))?,
            stride,
            groups,
            same,
        })
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let k = self.weight.dims()[2];
        if k == 1 && self.groups == 1 && self.stride == 1 {
            // A pointwise convolution is a Linear over channels, taken through the kernels
            // door: burn 0.21's GPU convolution runs it as an autotuned matmul whose
            // double-buffered routine gets inner sizes of 24 wrong (the selfie network's 24-wide
            // 1x1 layers on wgpu, max abs error 2.1); the door's f32 product does not.
            let o = self.weight.dims()[0];
            let rows = x.reshape([b, c, h * w]).swap_dims(1, 2); // [B, H*W, C]
            let wt = self.weight.clone().reshape([o, c]).transpose(); // [C, O]
            let y = crate::kernels::of::<B>().linear(rows, wt, Some(self.bias.clone()));
            return y.swap_dims(1, 2).reshape([b, o, h, w]);
        }
        let (mut x, mut pad) = (x, [0, 0]);
        if self.same && k > 1 {
            let (t, b) = same_padding(h, k, self.stride);
            let (l, r) = same_padding(w, k, self.stride);
            if t == b && l == r {
                pad = [t, l];
            } else {
                x = x.pad((l, r, t, b), PadMode::Constant(0.0));
            }
        }
        crate::kernels::of::<B>().conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            ConvOptions::new([self.stride; 2], pad, [1, 1], self.groups),
        )
    }
}

/// PReLU with one slope per channel: `[C]`.
#[derive(Debug, Clone)]
pub struct PRelu<B: Backend> {
    pub alpha: Tensor<B, 1>,
}

impl<B: Backend> PRelu<B> {
    pub fn load(l: &Loader<B>, name: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            alpha: l.tensor(&format!("{name}.alpha"))?,
        })
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        prelu(x, self.alpha.clone())
    }
}

/// Global average over `[H, W]`: `[B, C, H, W]` -> `[B, C, 1, 1]`.
pub fn global_mean<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.mean_dim(3).mean_dim(2)
}

/// Channel gate of squeeze-excitation: `sigmoid(up(relu(down(mean(x)))))`, `[B, C, 1, 1]`.
#[derive(Debug, Clone)]
pub struct Gate<B: Backend> {
    pub down: Conv<B>,
    pub up: Conv<B>,
}

impl<B: Backend> Gate<B> {
    pub fn load(l: &Loader<B>, down: &str, up: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            down: Conv::load(l, down, 1, false, false)?,
            up: Conv::load(l, up, 1, false, false)?,
        })
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        sigmoid(self.up.forward(relu(self.down.forward(global_mean(x)))))
    }
}

/// 2x bilinear upsampling with half-pixel centres (TensorFlow's `half_pixel_centers`, PyTorch's
/// `align_corners=False`): output `2i` is `0.75 x[i] + 0.25 x[i-1]`, `2i+1` is
/// `0.75 x[i] + 0.25 x[i+1]`, edges clamped.
pub fn upsample2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    fn axis<B: Backend>(x: Tensor<B, 4>, dim: usize) -> Tensor<B, 4> {
        let n = x.dims()[dim];
        let prev = Tensor::cat(
            vec![x.clone().narrow(dim, 0, 1), x.clone().narrow(dim, 0, n - 1)],
            dim,
        );
        let next = Tensor::cat(
            vec![
                x.clone().narrow(dim, 1, n - 1),
                x.clone().narrow(dim, n - 1, 1),
            ],
            dim,
        );
        let even = x.clone().mul_scalar(0.75) + prev.mul_scalar(0.25);
        let odd = x.mul_scalar(0.75) + next.mul_scalar(0.25);
        // Interleave: stack on a new axis after `dim`, then merge the two.
        let mut dims = even.dims();
        let stacked: Tensor<B, 5> = Tensor::stack(vec![even, odd], dim + 1);
        dims[dim] *= 2;
        stacked.reshape(dims)
    }
    axis(axis(x, 2), 3)
}

/// A transposed convolution whose kernel equals its stride (2x2, stride 2): every input pixel
/// becomes a 2x2 block. Weight `[C, O, 2, 2]`.
#[derive(Debug, Clone)]
pub struct Upconv<B: Backend> {
    pub weight: Tensor<B, 4>,
    pub bias: Tensor<B, 1>,
}

impl<B: Backend> Upconv<B> {
    pub fn load(l: &Loader<B>, name: &str) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: l.tensor(&format!("{name}.weight"))?,
            bias: l.tensor(&format!("{name}.bias"))?,
        })
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let k = self.weight.dims()[2];
        conv_transpose2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            ConvTransposeOptions::new([k, k], [0, 0], [0, 0], [1, 1], 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // Stride 1: symmetric. Stride 2 on an even size: the extra pixel goes after.
        assert_eq!(same_padding(96, 3, 1), (1, 1));
        assert_eq!(same_padding(192, 3, 2), (0, 1));
        assert_eq!(same_padding(32, 5, 2), (1, 2));
        assert_eq!(same_padding(3, 3, 3), (0, 0));
    }

    #[test]
    fn upsample_interpolates_with_half_pixel_centres() {
        type B = burn::backend::Flex;
        let d = Default::default();
        let x = Tensor::<B, 4>::from_floats([[[[0.0, 4.0], [8.0, 12.0]]]], &d);
        let y: Vec<f32> = upsample2(x).into_data().to_vec().unwrap();
        // Rows 0..4 of the 4x4 output, first row: 0, 1, 3, 4 (0.75/0.25 mixes, edges clamped).
        assert_eq!(&y[..4], &[0.0, 1.0, 3.0, 4.0]);
        assert_eq!(&y[4..8], &[2.0, 3.0, 5.0, 6.0]);
        assert_eq!(&y[12..], &[8.0, 9.0, 11.0, 12.0]);
    }
}
