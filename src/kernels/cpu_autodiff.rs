//! Training on the CPU: attention and GELU as single autodiff ops with their own backward
//! kernels (`cpu_kernels`), for `Autodiff<Flex>`. Through burn's generic ops the decoder's
//! attention at 1568 tokens records every matrix product, softmax pass and reshape of an
//! `[B, H, N, N]` tensor and replays them one thread at a time in backward; here the forward
//! keeps q, k, v, the output and one log-sum-exp per row, and the backward recomputes the
//! probabilities block by block on all cores.
//!
//! The model code stays generic over `B: Backend`: [`attention`] and [`gelu`] take the fast
//! path when `B` is `Autodiff<Flex>` (checked by type at run time) and hand the tensor back
//! otherwise.

use super::cpu as cpu_kernels;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use std::sync::Arc;

type Ad = Autodiff<Flex>;
type AdTensor = burn::tensor::ops::FloatTensor<Ad>;

/// Multi-head attention from the fused qkv projection `[B, N, 3*H*hd]` -> `[B, N, H*hd]`
/// as one autodiff op, when `B` is `Autodiff<Flex>`; otherwise `Err(qkv)` untouched.
pub fn attention<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    scale: f32,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    if qkv.dtype() != DType::F32 {
        return Err(qkv);
    }
    with_ad(qkv, |t| {
        let dims = t.primitive.layout().shape().clone();
        let (b, n, d3) = (dims[0], dims[1], dims[2]);
        attention_op(t, [b, n, heads, d3 / 3 / heads], scale)
    })
}

/// Exact GELU as one autodiff op, when `B` is `Autodiff<Flex>`; otherwise `Err(x)`.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    with_ad(x, gelu_op)
}

/// Run `op` on the `Autodiff<Flex>` primitive behind `t`, or give `t` back.
fn with_ad<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    op: impl FnOnce(AdTensor) -> AdTensor,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let ad = super::primitive_as::<B, AdTensor, D>(t)?;
    Ok(super::from_primitive_as::<B, _, D>(op(ad)))
}

/// Host copy (or the buffer itself when not shared) of an f32 Flex tensor.
fn host(t: FlexTensor) -> Vec<f32> {
    // Every tensor here is f32 (checked by the callers), so the conversion cannot fail.
    t.into_data()
        .into_vec::<f32>()
        .expect("an f32 tensor converts to Vec<f32>")
}

fn flex(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

#[derive(Debug, Clone)]
struct AttentionState {
    qkv: Arc<Vec<f32>>,
    out: Arc<Vec<f32>>,
    lse: Arc<Vec<f32>>,
    /// b, n, heads, head_dim
    dims: [usize; 4],
    scale: f32,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<AttentionState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = host(grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let s = ops.state;
        let [b, n, h, hd] = s.dims;
        let dqkv =
            cpu_kernels::attention_backward(&s.qkv, &s.out, &grad, &s.lse, b, n, h, hd, s.scale);
        grads.register::<Flex>(parent.id, flex(dqkv, vec![b, n, 3 * h * hd]));
    }
}

fn attention_op(qkv: AdTensor, [b, n, h, hd]: [usize; 4], scale: f32) -> AdTensor {
    let data = host(qkv.primitive.clone());
    let mut lse = vec![0f32; b * h * n];
    let out = cpu_kernels::attention_lse(&data, b, n, h, hd, scale, Some(&mut lse));
    let shape = vec![b, n, h * hd];
    match AttentionBackward
        .prepare::<NoCheckpointing>([qkv.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = Arc::new(out);
            let state = AttentionState {
                qkv: Arc::new(data),
                out: out.clone(),
                lse: Arc::new(lse),
                dims: [b, n, h, hd],
                scale,
            };
            prep.finish(state, flex(out.as_ref().clone(), shape))
        }
        OpsKind::UnTracked(prep) => prep.finish(flex(out, shape)),
    }
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The input and its shape.
    type State = (Arc<Vec<f32>>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let mut grad = host(grads.consume::<Flex>(&ops.node));
        let Some(parent) = parent else { return };
        let (x, shape) = ops.state;
        cpu_kernels::gelu_backward_in_place(&x, &mut grad);
        grads.register::<Flex>(parent.id, flex(grad, shape));
    }
}

fn gelu_op(x: AdTensor) -> AdTensor {
    let shape = x.primitive.layout().shape().to_vec();
    let input = host(x.primitive.clone());
    let mut y = input.clone();
    cpu_kernels::gelu_in_place(&mut y);
    match GeluBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((Arc::new(input), shape.clone()), flex(y, shape)),
        OpsKind::UnTracked(prep) => prep.finish(flex(y, shape)),
    }
}
