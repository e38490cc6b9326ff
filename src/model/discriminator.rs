//! The patch discriminator (critic) of adversarial pretraining:
//! Linear(P, 4*D_dec) -> LeakyReLU(0.01) -> Linear(4*D_dec, 1), applied per tubelet patch.

use super::load::linear;
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::leaky_relu;
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Discriminator<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Discriminator<B> {
    /// Unfilled (lazy) critic over patches of `patch_dim` values with `hidden` units.
    pub fn new(patch_dim: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            fc1: linear(patch_dim, hidden, true, device),
            fc2: linear(hidden, 1, true, device),
        }
    }

    /// The gradient of each patch's score with respect to that patch, `[B, K, P]`, written as
    /// an expression of the weights: W1 · (LeakyReLU'(x W1 + b1) ⊙ w2). LeakyReLU's slope is
    /// piecewise constant (1 above 0, 0.01 at or below, as torch's backward), so the weights'
    /// first-order gradients of anything built on this equal what double backpropagation gives
    /// for the gradient penalty.
    pub fn input_gradient(&self, patches: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, k, p] = patches.dims();
        let kern = crate::kernels::of::<B>();
        let z = super::block::linear(kern, &self.fc1, patches).detach();
        let h = z.dims()[2];
        let slope = z
            .greater_elem(0.0)
            .float()
            .mul_scalar(1.0 - 0.01)
            .add_scalar(0.01);
        // [B, K, H] ⊙ w2ᵀ, then · W1ᵀ [H, P] (the kernels' product, in their precision)
        let w2 = self.fc2.weight.val().reshape([1, 1, h]);
        let s = slope * w2;
        let out = kern.linear(s, self.fc1.weight.val().transpose(), None);
        debug_assert_eq!(out.dims(), [b, k, p]);
        out
    }

    /// Patches `[B, K, P]` -> scores `[B, K, 1]`.
    pub fn forward(&self, patches: Tensor<B, 3>) -> Tensor<B, 3> {
        let k = crate::kernels::of::<B>();
        let h = leaky_relu(super::block::linear(k, &self.fc1, patches), 0.01);
        super::block::linear(k, &self.fc2, h)
    }
}
