//! Tubelet patch embedding and the (un)patchify maps between clips and tubelet tokens.
//!
//! The reference embeds with Conv3d(kernel = stride = (tubelet, patch, patch)); a convolution whose
//! kernel equals its stride is a matrix product over flattened tubelets, so we patchify once and
//! apply a Linear whose weight is the Conv weight flattened in (c, pt, ph, pw) order. The same
//! patchify gives the reconstruction target.

use burn::tensor::{backend::Backend, Tensor};

/// Tubelet geometry: `tubelet` frames by `patch` x `patch` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TubeletShape {
    pub tubelet: usize,
    pub patch: usize,
}

/// Clip `[B, C, T, H, W]` -> tokens `[B, N, C*tubelet*patch*patch]`; tokens in (t, h, w) order,
/// values in (c, pt, ph, pw) order (through the kernels door: an 8-d permute in burn's ops, a
/// host copy on the CPU).
pub fn patchify<B: Backend>(x: Tensor<B, 5>, s: TubeletShape) -> Tensor<B, 3> {
    crate::kernels::of::<B>().patchify(x, s.tubelet, s.patch)
}

/// Inverse of [`patchify`]: tokens `[B, N, C*tubelet*patch*patch]` -> clip `[B, C, T, H, W]`
/// for a clip of `frames` frames of `size` x `size` pixels.
pub fn unpatchify<B: Backend>(
    x: Tensor<B, 3>,
    s: TubeletShape,
    frames: usize,
    size: usize,
) -> Tensor<B, 5> {
    let [b, _, pd] = x.dims();
    let c = pd / (s.tubelet * s.patch * s.patch);
    let (nt, nh, nw) = (frames / s.tubelet, size / s.patch, size / s.patch);
    x.reshape([b, nt, nh, nw, c, s.tubelet, s.patch, s.patch])
        .permute([0, 4, 1, 5, 2, 6, 3, 7])
        .reshape([b, c, frames, size, size])
}
