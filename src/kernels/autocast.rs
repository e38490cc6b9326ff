//! Products in a chosen precision with burn's generic ops, for any backend: what the CUDA
//! backend runs in TF32 and bf16 (and what its autodiff trains with).
//!
//! bf16 follows PyTorch's `autocast(dtype=torch.bfloat16)`: parameters stay f32 (the master
//! weights an optimizer updates), the operands of each matrix product are cast to bf16 where
//! it is taken, sums are f32 in the kernels, and the result is cast back to f32 before biases,
//! residuals, LayerNorm, softmax and GELU. Gradients flow through the casts.
//!
//! Attention passes burn no scale when the model's scale is the default `head_dim^-0.5`
//! (every MARLIN model): burn 0.21's CUDA backend takes its flash-attention kernel (autotuned
//! against the unfused one) only when `scale`, `attn_bias` and `softcap` are all `None`.
//! [`super::set_flash_attention`]`(false)` (or `MARLIN_FLASH_ATTENTION=0`) passes the scale,
//! which keeps burn on its unfused attention: to compare the two, or to step around the
//! flash kernel's autotune if it fails on a shape.

use super::Precision;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, DType, Tensor};

/// `x [B, N, in] · w [in, out] (+ b [out])` with its product in `p`.
pub fn linear<B: Backend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
    p: Precision,
) -> Tensor<B, 3> {
    match p {
        Precision::Bf16 => {
            let y = burn::tensor::module::linear(x.cast(DType::BF16), w.cast(DType::BF16), None)
                .cast(DType::F32);
            match b {
                Some(b) => y + b.unsqueeze::<3>(),
                None => y,
            }
        }
        Precision::F32 | Precision::Tf32 => burn::tensor::module::linear(x, w, b),
    }
}

/// Whether `scale` is the default `head_dim^-0.5` (to f32 rounding), which burn's attention
/// applies itself when given none.
pub fn is_default_scale(scale: f32, head_dim: usize) -> bool {
    let d = (head_dim as f32).powf(-0.5);
    (scale - d).abs() <= 1e-6 * d
}

/// Multi-head attention from the fused projection `[B, N, 3 * D]` to `[B, N, D]` with its two
/// products in `p` (softmax in f32).
pub fn attention_qkv<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    scale: f32,
    p: Precision,
) -> Tensor<B, 3> {
    let [b, n, d3] = qkv.dims();
    let d = d3 / 3;
    let hd = d / heads;
    let qkv = match p {
        Precision::Bf16 => qkv.cast(DType::BF16),
        Precision::F32 | Precision::Tf32 => qkv,
    };
    // [B, N, 3, H, hd] -> [3, B, H, N, hd]
    let qkv = qkv.reshape([b, n, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
    let mut parts = qkv.chunk(3, 0).into_iter().map(|t| t.squeeze_dim::<4>(0));
    // chunk(3) of a size-3 dim yields exactly three parts.
    let (q, k, v) = (
        parts.next().expect("q"),
        parts.next().expect("k"),
        parts.next().expect("v"),
    );
    let fused = super::flash_attention() && is_default_scale(scale, hd);
    let opts = AttentionModuleOptions {
        scale: (!fused).then_some(scale as f64),
        softcap: None,
        is_causal: false,
    };
    let out = attention(q, k, v, None, None, opts); // [B, H, N, hd]
    out.swap_dims(1, 2).reshape([b, n, d]).cast(DType::F32)
}

/// The kernels of a backend without host kernels of its own, in the GPU precision
/// ([`super::gpu_precision`]): CUDA in TF32 and bf16, and CUDA's autodiff.
pub struct Autocast;

impl<B: Backend> super::Kernels<B> for Autocast {
    fn name(&self) -> &'static str {
        "autocast"
    }

    fn attention(&self, qkv: Tensor<B, 3>, heads: usize, scale: f32) -> Tensor<B, 3> {
        attention_qkv(qkv, heads, scale, super::gpu_precision())
    }

    fn linear(&self, x: Tensor<B, 3>, w: Tensor<B, 2>, b: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
        linear(x, w, b, super::gpu_precision())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn input(shape: [usize; 3], seed: usize) -> Tensor<Flex, 3> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn max_diff(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> f32 {
        assert_eq!(a.dtype(), DType::F32, "results come back in f32");
        let (a, b) = (crate::util::check::values(a), crate::util::check::values(b));
        crate::util::check::max_abs_diff(&a, &b)
    }

    #[test]
    fn the_default_scale_is_recognised() {
        assert!(is_default_scale(64f32.powf(-0.5), 64));
        assert!(is_default_scale(0.125, 64));
        assert!(!is_default_scale(0.1, 64));
        assert!(!is_default_scale(0.125, 32));
    }

    /// The f32 path is burn's ops; bf16 operands differ from it by bf16 rounding (2^-8
    /// relative per operand) and no more: a wrong cast, a lost bias or a product left in bf16
    /// end to end would be far off.
    #[test]
    fn bf16_products_stay_within_bf16_rounding_of_f32() {
        let x = input([2, 50, 64], 1);
        let w: Tensor<Flex, 2> = input([1, 64, 96], 2).squeeze_dim(0) / 8.0;
        let b: Tensor<Flex, 1> = input([1, 1, 96], 3).reshape([96]);
        let exact = linear(x.clone(), w.clone(), Some(b.clone()), Precision::F32);
        let want = burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()));
        assert_eq!(max_diff(exact.clone(), want), 0.0);
        let half = linear(x, w, Some(b), Precision::Bf16);
        let d = max_diff(half, exact.clone());
        let scale = crate::util::check::max_abs(&crate::util::check::values(exact));
        assert!(d > 0.0 && d <= 2e-2 * scale, "linear: {d} of {scale}");

        let qkv = input([2, 50, 96], 4);
        let exact = attention_qkv(qkv.clone(), 4, 8f32.powf(-0.5), Precision::F32);
        let reference = super::super::generic_attention(qkv.clone(), 4, 8f32.powf(-0.5));
        assert!(max_diff(exact.clone(), reference) <= 1e-5);
        let half = attention_qkv(qkv, 4, 8f32.powf(-0.5), Precision::Bf16);
        let d = max_diff(half, exact);
        assert!(d > 0.0 && d <= 2e-2, "attention: {d}");
    }

    /// Gradients reach the f32 parameters through the casts (bf16 mixed precision trains the
    /// f32 master weights).
    #[test]
    fn bf16_gradients_reach_f32_weights() {
        type Ad = burn::backend::Autodiff<Flex>;
        let x: Tensor<Ad, 3> = Tensor::from_inner(input([2, 10, 16], 5));
        let w: Tensor<Ad, 2> =
            Tensor::from_inner(input([1, 16, 8], 6).squeeze_dim::<2>(0)).require_grad();
        let grads = |p| {
            let y = linear(x.clone(), w.clone(), None, p);
            let g = y.powi_scalar(2).sum().backward();
            let gw = w.grad(&g).expect("w has a gradient");
            assert_eq!(gw.dtype(), DType::F32);
            gw.into_data().into_vec::<f32>().expect("f32")
        };
        let (exact, half) = (grads(Precision::F32), grads(Precision::Bf16));
        let scale = crate::util::check::max_abs(&exact);
        let d = crate::util::check::max_abs_diff(&exact, &half);
        assert!(scale > 0.0 && d <= 3e-2 * scale, "grad: {d} of {scale}");
    }
}
