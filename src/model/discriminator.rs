//! The patch discriminator (critic) of adversarial pretraining:
//! Linear(P, 4*D_dec) -> LeakyReLU(0.01) -> Linear(4*D_dec, 1), applied per tubelet patch.

use super::load::{Exporter, Loader};
use super::weights::WeightsError;
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
    pub fn load(l: &Loader<B>) -> Result<Self, WeightsError> {
        Ok(Self {
            fc1: l.linear("discriminator.layers.0.linear", true)?,
            fc2: l.linear("discriminator.layers.1.linear", true)?,
        })
    }

    pub fn export(&self, e: &mut Exporter) {
        e.linear("discriminator.layers.0.linear", &self.fc1);
        e.linear("discriminator.layers.1.linear", &self.fc2);
    }

    /// Patches `[B, K, P]` -> scores `[B, K, 1]`.
    pub fn forward(&self, patches: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(leaky_relu(self.fc1.forward(patches), 0.01))
    }
}
