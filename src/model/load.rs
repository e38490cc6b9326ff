//! Host <-> device helpers: reading tensors back, the lazy parameters of unfilled modules
//! (filled by [`super::keys::KeyMap::load`]), and a name-by-name [`Loader`] for networks whose
//! weights are embedded (the face detector's).

pub use super::host::{to_f32_vec, to_host, to_scalar};
use super::host::{HostTensor, StateDict, WeightsError};
use burn::module::Param;
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::Shape;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// LayerNorm epsilon of the reference (torch default).
pub const LN_EPS: f64 = 1e-5;

/// Builds burn parameters from a checked state dict.
pub struct Loader<'a, B: Backend> {
    pub sd: &'a StateDict,
    pub device: &'a B::Device,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(sd: &'a StateDict, device: &'a B::Device) -> Self {
        Self { sd, device }
    }

    fn host(&self, key: &str) -> Result<&HostTensor, WeightsError> {
        self.sd
            .tensors
            .get(key)
            .ok_or_else(|| WeightsError::Missing {
                file: self.sd.source.clone(),
                key: key.to_string(),
                expected: vec![],
                hint: String::new(),
            })
    }

    /// A tensor as stored (PyTorch layout).
    pub fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<B, D>, WeightsError> {
        let t = self.host(key)?;
        Ok(Tensor::from_data(
            TensorData::new(t.data.clone(), t.shape.clone()),
            self.device,
        ))
    }

    pub fn param<const D: usize>(&self, key: &str) -> Result<Param<Tensor<B, D>>, WeightsError> {
        Ok(Param::from_tensor(self.tensor(key)?))
    }

    /// A Linear layer: PyTorch `[out, in...]` weight (a Linear's, or a Conv whose kernel equals
    /// its stride, flattened) transposed to burn's `[in, out]`.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear<B>, WeightsError> {
        let w = self.host(&format!("{prefix}.weight"))?;
        let out = w.shape[0];
        let inp = w.data.len() / out.max(1);
        let t = super::host::transpose2d(&w.data, out, inp);
        let weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(t, [inp, out]),
            self.device,
        ));
        let bias = if bias {
            Some(self.param::<1>(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

/// A lazy parameter of `shape`: nothing is allocated until it is read, and loading replaces it.
pub fn lazy<B: Backend, const D: usize, S: Into<Shape>>(
    shape: S,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Initializer::Zeros.init(shape, device)
}

/// An unfilled Linear `[d_in, d_out]` (lazy).
pub fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// An unfilled LayerNorm with the reference's epsilon (lazy).
pub fn layer_norm<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device)
}
