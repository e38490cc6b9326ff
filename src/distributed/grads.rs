//! A module's gradients averaged across the ranks in one bucket: every float parameter's
//! gradient, in the module's own (fixed) parameter order, flattened into one f32 buffer with
//! any extra scalars the step shares (its losses), one all-reduce, and back into
//! [`GradientsParams`]. And a digest of a module's weights, for the start check.

use super::{DistError, Group};
use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::collections::HashMap;

/// Pass 1: take each parameter's gradient out, flattened.
struct Take<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Vec<Tensor<B::InnerBackend, 1>>,
    /// Parameter -> (offset, length) in the bucket.
    at: HashMap<ParamId, (usize, usize)>,
    len: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let n = g.shape().num_elements();
            self.at.insert(param.id, (self.len, n));
            self.len += n;
            self.flat.push(g.reshape([n]));
        }
    }
}

/// Pass 2: put the averaged gradients back under the same parameters.
struct Put<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    bucket: Tensor<B::InnerBackend, 1>,
    at: &'a HashMap<ParamId, (usize, usize)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Put<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(&(o, n)) = self.at.get(&param.id) {
            let g = self
                .bucket
                .clone()
                .slice(o..o + n)
                .reshape(param.val().dims());
            self.grads.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

fn to_f32<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    // `convert::<f32>` makes the data f32 whatever the backend's float type, so reading it
    // back as f32 cannot fail.
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("data converted to f32 reads back as f32")
}

/// `grads` of `module` averaged across `group` (one bucketed all-reduce), with `extra` (the
/// step's losses, say) averaged in the same call. `what` names the update in errors.
pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    group: &Group,
    module: &M,
    mut grads: GradientsParams,
    extra: &mut [f32],
    what: &str,
) -> Result<GradientsParams, DistError> {
    let mut take = Take::<B> {
        grads: &mut grads,
        flat: Vec::new(),
        at: HashMap::new(),
        len: 0,
    };
    module.visit(&mut take);
    let (flat, at, len) = (take.flat, take.at, take.len);
    let device = flat.first().map(Tensor::device);
    let mut host = match flat.is_empty() {
        true => Vec::new(),
        false => to_f32(Tensor::cat(flat, 0)),
    };
    host.extend_from_slice(extra);
    // After the backward, not overlapped: the step waits for all of it.
    let t0 = std::time::Instant::now();
    let res = group.all_reduce_mean(&mut host, what);
    group.add_waited(t0.elapsed().as_secs_f64());
    res?;
    extra.copy_from_slice(&host[len..]);
    host.truncate(len);
    if let Some(device) = device {
        let bucket = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(host, [len]), &device);
        let mut put = Put::<B> {
            grads: &mut grads,
            bucket,
            at: &at,
        };
        module.visit(&mut put);
    }
    Ok(grads)
}

/// Digest of every float parameter of `module` (FNV-1a over the f32 bits, in parameter
/// order): equal on two ranks when their weights are.
pub fn weights_digest<B: Backend, M: burn::module::Module<B>>(module: &M) -> String {
    struct Digest(u64, usize);
    impl<B: Backend> ModuleVisitor<B> for Digest {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.val().shape().num_elements();
            for v in to_f32(param.val().reshape([n])) {
                for b in v.to_bits().to_le_bytes() {
                    self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
                }
            }
            self.1 += n;
        }
    }
    let mut d = Digest(0xcbf2_9ce4_8422_2325, 0);
    module.visit(&mut d);
    format!("{} weights, digest {:016x}", d.1, d.0)
}
