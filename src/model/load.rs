//! Moving parameters between a [`StateDict`] (PyTorch layout, host) and burn modules.

use super::weights::{HostTensor, StateDict, WeightsError};
use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// LayerNorm epsilon of the reference (torch default).
pub const LN_EPS: f64 = 1e-5;

/// Two optional vector parameters.
pub type OptionalPair<B> = (Option<Param<Tensor<B, 1>>>, Option<Param<Tensor<B, 1>>>);

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

    /// Two optional vectors `{prefix}.{a}`, `{prefix}.{b}` (q/v bias, layer-scale gammas).
    pub fn optional_pair(
        &self,
        prefix: &str,
        (a, b): (&str, &str),
        present: bool,
    ) -> Result<OptionalPair<B>, WeightsError> {
        if !present {
            return Ok((None, None));
        }
        Ok((
            Some(self.param(&format!("{prefix}.{a}"))?),
            Some(self.param(&format!("{prefix}.{b}"))?),
        ))
    }

    /// A Linear layer: PyTorch `[out, in...]` weight (a Linear's, or a Conv whose kernel equals
    /// its stride, flattened) transposed to burn's `[in, out]`.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear<B>, WeightsError> {
        let w = self.host(&format!("{prefix}.weight"))?;
        let out = w.shape[0];
        let inp = w.data.len() / out.max(1);
        let mut t = vec![0f32; w.data.len()];
        for o in 0..out {
            for i in 0..inp {
                t[i * out + o] = w.data[o * inp + i];
            }
        }
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

    pub fn layer_norm(&self, prefix: &str) -> Result<LayerNorm<B>, WeightsError> {
        let gamma = self.param::<1>(&format!("{prefix}.weight"))?;
        let d = gamma.dims()[0];
        let mut ln = LayerNormConfig::new(d)
            .with_epsilon(LN_EPS)
            .init(self.device);
        ln.gamma = gamma;
        ln.beta = Some(self.param::<1>(&format!("{prefix}.bias"))?);
        Ok(ln)
    }
}

/// A float tensor's values as `f32`, row-major.
pub fn to_f32_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // `convert::<f32>` makes the data f32 whatever the backend's float type, so reading it
    // back as f32 cannot fail.
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("data converted to f32 reads back as f32")
}

/// A tensor back to host memory.
pub fn to_host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> HostTensor {
    HostTensor::new(t.dims().to_vec(), to_f32_vec(t.clone()))
}

/// The first value of a tensor (a loss) as f64 (NaN for an empty tensor).
pub fn to_scalar<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    to_f32_vec(t).first().copied().unwrap_or(f32::NAN) as f64
}

/// Exports burn parameters to a state dict with official names.
pub struct Exporter<'a> {
    pub sd: &'a mut StateDict,
}

impl Exporter<'_> {
    pub fn tensor<B: Backend, const D: usize>(&mut self, key: &str, t: &Tensor<B, D>) {
        self.sd.tensors.insert(key.to_string(), to_host(t));
    }

    pub fn linear<B: Backend>(&mut self, prefix: &str, l: &Linear<B>) {
        let w = l.weight.val().transpose();
        self.tensor(&format!("{prefix}.weight"), &w);
        self.linear_bias(prefix, l);
    }

    /// A Linear stored as a Conv weight of `shape` (`[out, in...]`).
    pub fn linear_as_conv<B: Backend>(&mut self, prefix: &str, l: &Linear<B>, shape: Vec<usize>) {
        let mut w = to_host(&l.weight.val().transpose());
        w.shape = shape;
        self.sd.tensors.insert(format!("{prefix}.weight"), w);
        self.linear_bias(prefix, l);
    }

    fn linear_bias<B: Backend>(&mut self, prefix: &str, l: &Linear<B>) {
        if let Some(b) = &l.bias {
            self.tensor(&format!("{prefix}.bias"), &b.val());
        }
    }

    pub fn layer_norm<B: Backend>(&mut self, prefix: &str, ln: &LayerNorm<B>) {
        self.tensor(&format!("{prefix}.weight"), &ln.gamma.val());
        if let Some(b) = &ln.beta {
            self.tensor(&format!("{prefix}.bias"), &b.val());
        }
    }
}
