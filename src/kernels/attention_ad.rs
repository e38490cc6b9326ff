//! Attention as one autodiff op for any backend, in blocks of queries: what CUDA's autodiff
//! trains with (burn 0.21's autodiff attention records the unfused ops and keeps every
//! `[B, H, N, N]` probability matrix for backward).
//!
//! Forward, per block of `c` query rows: scores `q·kᵀ·scale` `[B*H, c, N]`, a softmax that keeps
//! each row's log-sum-exp, and the block's output. Only q, k, v (the input), the output and the
//! log-sum-exp `[B*H, N]` are kept. Backward recomputes each block's probabilities from the
//! log-sum-exp (as flash attention does): `dv += pᵀ·do`, `ds = p ⊙ (do·vᵀ - rowsum(do ⊙ o))`,
//! `dq = ds·k·scale`, `dk += dsᵀ·q·scale`. At the decoder's 1568 tokens the largest transient is
//! one block's `[B*H, c, N]` instead of the whole matrix for every layer until backward.
//!
//! The products go through `mm`, so each backend's precision applies (autocast bf16, CUDA's
//! f32 matmul).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};

/// A batched matrix product `[b, m, k] · [b, k, n]`.
pub type Matmul<I> = fn(Tensor<I, 3>, Tensor<I, 3>) -> Tensor<I, 3>;

/// Bytes of one block's scores at most (the block shrinks to fit, 32 rows at least).
pub const BLOCK_BYTES: usize = 256 << 20;

fn block_rows(bh: usize, n: usize, budget: usize) -> usize {
    (budget / (bh * n * 4).max(1)).clamp(32.min(n.max(1)), n.max(1))
}

/// `[B, N, 3*H*hd]` -> q, k, v `[B*H, N, hd]`.
fn split<I: Backend>(qkv: Tensor<I, 3>, heads: usize) -> [Tensor<I, 3>; 3] {
    let [b, n, d3] = qkv.dims();
    let hd = d3 / 3 / heads;
    let t = qkv
        .reshape([b, n, 3, heads, hd])
        .permute([2, 0, 3, 1, 4])
        .reshape([3, b * heads, n, hd]);
    let mut parts = t.chunk(3, 0).into_iter().map(|t| t.squeeze_dim::<3>(0));
    // chunk(3) of a size-3 dim yields exactly three parts.
    [
        parts.next().expect("q"),
        parts.next().expect("k"),
        parts.next().expect("v"),
    ]
}

/// `[B*H, N, hd]` -> `[B, N, H*hd]`.
fn merge<I: Backend>(o: Tensor<I, 3>, b: usize, heads: usize) -> Tensor<I, 3> {
    let [_, n, hd] = o.dims();
    o.reshape([b, heads, n, hd])
        .swap_dims(1, 2)
        .reshape([b, n, heads * hd])
}

/// Blocked attention of `heads` heads with scores scaled by `scale`, products through `mm`, and
/// blocks of query rows whose scores take at most `budget` bytes ([`BLOCK_BYTES`]).
#[derive(Debug, Clone, Copy)]
pub struct Blocked<I: Backend> {
    pub heads: usize,
    pub scale: f32,
    pub mm: Matmul<I>,
    pub budget: usize,
}

impl<I: Backend> Blocked<I> {
    /// The forward: output `[B, N, D]` and the log-sum-exp of each score row `[B*H, N, 1]`.
    pub fn forward(&self, qkv: Tensor<I, 3>) -> (Tensor<I, 3>, Tensor<I, 3>) {
        forward(qkv, self)
    }

    /// The gradient of the input `[B, N, 3*D]` from the output's gradient `dout` `[B, N, D]`.
    pub fn gradient(
        &self,
        qkv: Tensor<I, 3>,
        out: Tensor<I, 3>,
        lse: Tensor<I, 3>,
        dout: Tensor<I, 3>,
    ) -> Tensor<I, 3> {
        backward(qkv, out, lse, dout, self)
    }
}

fn forward<I: Backend>(qkv: Tensor<I, 3>, p: &Blocked<I>) -> (Tensor<I, 3>, Tensor<I, 3>) {
    let (heads, scale, mm, budget) = (p.heads, p.scale, p.mm, p.budget);
    let b = qkv.dims()[0];
    let [q, k, v] = split(qkv, heads);
    let [bh, n, _] = q.dims();
    let kt = k.swap_dims(1, 2);
    let c = block_rows(bh, n, budget);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for r in (0..n).step_by(c) {
        let e = (r + c).min(n);
        let s = mm(q.clone().slice_dim(1, r..e), kt.clone()) * scale;
        let m = s.clone().max_dim(2);
        let p = (s - m.clone()).exp();
        let l = p.clone().sum_dim(2);
        outs.push(mm(p / l.clone(), v.clone()));
        lses.push(m + l.log());
    }
    (merge(Tensor::cat(outs, 1), b, heads), Tensor::cat(lses, 1))
}

fn backward<I: Backend>(
    qkv: Tensor<I, 3>,
    out: Tensor<I, 3>,
    lse: Tensor<I, 3>,
    dout: Tensor<I, 3>,
    p: &Blocked<I>,
) -> Tensor<I, 3> {
    let (heads, scale, mm, budget) = (p.heads, p.scale, p.mm, p.budget);
    let [b, n, d3] = qkv.dims();
    let hd = d3 / 3 / heads;
    let [q, k, v] = split(qkv, heads);
    let bh = b * heads;
    let to_heads = |t: Tensor<I, 3>| {
        t.reshape([b, n, heads, hd])
            .swap_dims(1, 2)
            .reshape([bh, n, hd])
    };
    let (o, dout) = (to_heads(out), to_heads(dout));
    let delta = (dout.clone() * o).sum_dim(2); // [BH, N, 1]
    let (kt, vt) = (k.clone().swap_dims(1, 2), v.swap_dims(1, 2));
    let mut dk = Tensor::<I, 3>::zeros([bh, n, hd], &q.device());
    let mut dv = Tensor::<I, 3>::zeros([bh, n, hd], &q.device());
    let mut dqs = Vec::new();
    let c = block_rows(bh, n, budget);
    for r in (0..n).step_by(c) {
        let e = (r + c).min(n);
        let (qc, doc) = (
            q.clone().slice_dim(1, r..e),
            dout.clone().slice_dim(1, r..e),
        );
        let s = mm(qc.clone(), kt.clone()) * scale;
        let p = (s - lse.clone().slice_dim(1, r..e)).exp(); // [BH, c, N]
        dv = dv + mm(p.clone().swap_dims(1, 2), doc.clone());
        let dp = mm(doc, vt.clone());
        let ds = p * (dp - delta.clone().slice_dim(1, r..e));
        dqs.push(mm(ds.clone(), k.clone()) * scale);
        dk = dk + mm(ds.swap_dims(1, 2), qc) * scale;
    }
    let dq = Tensor::cat(dqs, 1);
    // [3, BH, N, hd] -> [B, N, 3, H, hd] -> [B, N, 3*D]
    Tensor::stack::<4>(vec![dq, dk, dv], 0)
        .reshape([3, b, heads, n, hd])
        .permute([1, 3, 0, 2, 4])
        .reshape([b, n, d3])
}

type State<I> = (
    burn::tensor::ops::FloatTensor<I>,
    burn::tensor::ops::FloatTensor<I>,
    burn::tensor::ops::FloatTensor<I>,
);

impl<I: Backend> Backward<I, 1> for Blocked<I> {
    /// The input, the output and the log-sum-exp.
    type State = State<I>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dout = grads.consume::<I>(&ops.node);
        let Some(parent) = parent else { return };
        let (qkv, out, lse) = ops.state;
        let t = |p| Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(p));
        let d = self.gradient(t(qkv), t(out), t(lse), t(dout));
        grads.register::<I>(parent.id, d.into_primitive().tensor());
    }
}

/// Attention from the fused projection `[B, N, 3*D]` to `[B, N, D]` as one autodiff op when
/// `B` is `Autodiff<I>`; `Err(qkv)` untouched otherwise. Blocks of query rows whose scores take
/// at most `budget` bytes ([`BLOCK_BYTES`]).
pub fn attention<B: Backend, I: Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    scale: f32,
    mm: Matmul<I>,
    budget: usize,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    type AdTensor<I> = burn::tensor::ops::FloatTensor<Autodiff<I>>;
    let t = super::primitive_as::<B, AdTensor<I>, 3>(qkv)?;
    let inner = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(t.primitive.clone()));
    let op = Blocked {
        heads,
        scale,
        mm,
        budget,
    };
    let (out, lse) = op.forward(inner);
    let out_p = out.clone().into_primitive().tensor();
    let result = match op
        .prepare::<NoCheckpointing>([t.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (t.primitive, out_p.clone(), lse.into_primitive().tensor()),
            out_p,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out_p),
    };
    Ok(super::from_primitive_as::<B, _, 3>(result))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type Ad = Autodiff<Flex>;

    fn mm(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
        a.matmul(b)
    }

    fn max_diff(a: Vec<f32>, b: Vec<f32>) -> f32 {
        crate::util::check::max_abs_diff(&a, &b)
    }

    /// Output and input gradient equal burn's attention through its own autodiff, with blocks
    /// smaller than the sequence (70 tokens in blocks of 32).
    #[test]
    fn blocked_attention_and_its_gradient_equal_burns() {
        let (b, n, heads, hd) = (2, 70, 3, 8);
        let v: Vec<f32> = (0..b * n * 3 * heads * hd)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let data = TensorData::new(v, [b, n, 3 * heads * hd]);
        let w: Vec<f32> = (0..b * n * heads * hd)
            .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let weight =
            Tensor::<Ad, 3>::from_data(TensorData::new(w, [b, n, heads * hd]), &Default::default());
        let scale = (hd as f32).powf(-0.5);
        // Blocks of 32 rows: 32, 32 and 6 of the 70.
        let budget = 32 * b * heads * n * 4;
        assert_eq!(block_rows(b * heads, n, budget), 32);
        assert_eq!(block_rows(b * heads, n, BLOCK_BYTES), n);
        let run = |ours: bool| {
            let x = Tensor::<Ad, 3>::from_data(data.clone(), &Default::default()).require_grad();
            let y = if ours {
                attention::<Ad, Flex>(x.clone(), heads, scale, mm, budget).expect("Autodiff<Flex>")
            } else {
                super::super::generic_attention(x.clone(), heads, scale)
            };
            let g = (y.clone() * weight.clone()).sum().backward();
            let dx = x.grad(&g).expect("a gradient");
            (
                y.into_data().into_vec::<f32>().unwrap(),
                dx.into_data().into_vec::<f32>().unwrap(),
            )
        };
        let (y0, g0) = run(false);
        let (y1, g1) = run(true);
        let (dy, dg) = (max_diff(y0, y1), max_diff(g0, g1));
        assert!(dy <= 1e-5 && dg <= 1e-4, "output {dy}, gradient {dg}");
        // Not an Autodiff backend: handed back.
        let plain = Tensor::<Flex, 3>::from_data(data, &Default::default());
        assert!(attention::<Flex, Flex>(plain, heads, scale, mm, budget).is_err());
    }
}
