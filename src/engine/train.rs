//! The pretraining step (critic update, then generator update, as [`crate::train::Pretrainer`])
//! written once as a hand-scheduled forward and backward over a small ops interface
//! ([`TrainOps`]), run by the host kernels ([`super::host_train`], checked against the peer's
//! step in every test run) and, next, by the CUDA engine's ops.
//!
//! ```text
//! Clips ─patchify─► Tokens [B·N, P] ─gather visible─► Tv [B·nv, P]      ─gather masked─► Target
//! X = Tv·Wpeᵀ + b + pos[visible]                     [B·nv, D]
//! encoder blocks (tape kept)  ─LN─► E ─·Wedᵀ─► Y    [B·nv, Dd]
//! Z = (Y + dpos[visible] ‖ mask_token + dpos[masked]) per clip   [B·(nv+nm), Dd]
//! decoder blocks ─last nm rows─► LN ─·Wheadᵀ + b─► Pred [B·nm, P]
//! rec = mean((Pred - Target)²); critic C(p) = LeakyReLU(p·W1ᵀ + b1)·W2ᵀ + b2
//! critic update:    d_loss = mean C(Pred) - mean C(Target)   (Pred without gradient)
//! generator update: g_loss = rec - adv_weight·mean C(Pred)
//! ```
//!
//! The generator runs forward once per step: the critic update's forward keeps the activations
//! the generator update's backward starts from (the critic's update leaves the generator
//! alone). In bf16 ([`PretrainStep::new_in`]) the blocks' activations are stored as bf16.
//!
//! Parameters live in flat buffers per optimiser (generator, critic) in the peer's names and
//! layouts (a Linear's weight `[out, in]`), so an update is one fused AdamW over one buffer and
//! gradients are contiguous for bucketed all-reduces. Every gradient accumulates into a
//! zeroed buffer. The positional tables are constants (no gradient, no update).

use super::host_train::HostTrainOps;
pub use super::schedule::DType;
use crate::distributed::{DistError, Group};
use crate::kernels::cpu_train::AdamW;
use crate::model::host::{HostTensor, StateDict};
use crate::model::MaskIndices;
use crate::train::{LossConfig, StepLosses};
use crate::MarlinConfig;
use std::collections::HashMap;
use std::sync::Arc;

/// Why the training engine cannot take a model (it stays on burn's path).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainEngineError {
    #[error("the training engine needs `{0}` in the model's weights")]
    Missing(String),
    #[error("`{key}` is {got:?}, the config implies {want:?}")]
    Shape {
        key: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("the training engine does not cover {0} yet: burn's path trains it")]
    Unsupported(&'static str),
    #[error("a batch of {got} clips with {vis} visible tokens, the engine was built for {want} with {want_vis}")]
    Batch {
        got: usize,
        vis: usize,
        want: usize,
        want_vis: usize,
    },
    #[error("a batch of {got} clips, the engine was built for {want}")]
    BatchSize { got: usize, want: usize },
    #[error("{0}")]
    Device(String),
}

/// A slice of one of the ops' float buffers: `len` values from `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct T {
    pub buf: usize,
    pub off: usize,
    pub len: usize,
}

impl T {
    /// `len` values from `off` within this slice.
    pub fn at(self, off: usize, len: usize) -> T {
        debug_assert!(off + len <= self.len);
        T {
            buf: self.buf,
            off: self.off + off,
            len,
        }
    }

    /// The same slice of another buffer laid out alike (a parameter's gradient or moment).
    pub fn of(self, buf: usize) -> T {
        T { buf, ..self }
    }
}

/// An index buffer (token indices, u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct I {
    pub buf: usize,
    pub len: usize,
}

/// The buffers a schedule needs: float and index buffers by name and size, and each float
/// buffer's storage type (`dtypes`, parallel to `floats`): f32, or bf16 for the activations a
/// bf16 step keeps (values rounded to bf16 when written; read as f32).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    pub floats: Vec<(String, usize)>,
    pub dtypes: Vec<DType>,
    pub indices: Vec<(String, usize)>,
}

impl Layout {
    pub fn float(&mut self, name: impl Into<String>, len: usize) -> T {
        self.float_in(name, len, DType::F32)
    }

    /// A float buffer stored as `dtype`.
    pub fn float_in(&mut self, name: impl Into<String>, len: usize, dtype: DType) -> T {
        self.floats.push((name.into(), len));
        self.dtypes.push(dtype);
        T {
            buf: self.floats.len() - 1,
            off: 0,
            len,
        }
    }

    /// The storage type of float buffer `buf`.
    pub fn dtype(&self, buf: usize) -> DType {
        self.dtypes.get(buf).copied().unwrap_or(DType::F32)
    }

    /// Bytes of all float buffers in their storage types.
    pub fn float_bytes(&self) -> usize {
        (0..self.floats.len()).map(|b| self.bytes(b)).sum()
    }

    /// Bytes of float buffer `buf` in its storage type.
    pub fn bytes(&self, buf: usize) -> usize {
        self.floats[buf].1 * self.dtype(buf).bytes()
    }

    pub fn index(&mut self, name: impl Into<String>, len: usize) -> I {
        self.indices.push((name.into(), len));
        I {
            buf: self.indices.len() - 1,
            len,
        }
    }

    /// Values of all float buffers.
    pub fn float_values(&self) -> usize {
        self.floats.iter().map(|(_, n)| n).sum()
    }
}

/// Rows of a `[batch, per_batch, width]` buffer: from row `start` of each batch (`per_batch`
/// 0: one block of rows shared by every batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    pub t: T,
    pub per_batch: usize,
    pub start: usize,
}

/// `dst row (b, j) (+)= src row (b, idx[b, j])` for j < count (idx: the identity without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    pub src: Rows,
    pub idx: Option<I>,
    pub dst: Rows,
    pub batch: usize,
    pub count: usize,
    pub width: usize,
    pub accumulate: bool,
}

/// `d [m, n] (+)= op(a) · op(b) (+ bias)`: `a` `[m, k]` (stored `[k, m]` with `ta`), `b`
/// `[k, n]` (stored `[n, k]` with `tb`), all row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub d: T,
    pub a: T,
    pub ta: bool,
    pub b: T,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub bias: Option<T>,
    pub accumulate: bool,
}

/// How a step keeps what its backward reads of the blocks: the storage type of the kept
/// activations, and whether the LayerNorms' outputs and the MLP's GELU are kept per block or
/// recomputed by the backward from the kept inputs and statistics (three memory-bound passes per
/// block; on ViT-B a third less activation memory per clip). Both give the same values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activations {
    pub dtype: DType,
    pub recompute: bool,
}

impl From<DType> for Activations {
    fn from(dtype: DType) -> Self {
        Self {
            dtype,
            recompute: false,
        }
    }
}

impl Activations {
    /// What `ops` asks of the steps built on them.
    pub fn of<O: TrainOps>(ops: &O) -> Self {
        Self {
            dtype: ops.activation_dtype(),
            recompute: ops.recompute_activations(),
        }
    }
}

/// What runs the training schedule. Steps run in order; an implementation may queue them.
pub trait TrainOps {
    type Error: std::fmt::Display;
    /// The clips per batch of the step about to be built (device errors name it).
    fn set_batch(&mut self, _batch: usize) {}
    /// The storage type of the activations a step on these ops keeps (its precision): f32,
    /// or bf16 (products of bf16 operands with f32 sums, f32 residual stream, statistics,
    /// master weights and optimiser state).
    fn activation_dtype(&self) -> DType {
        DType::F32
    }
    /// Whether steps built on these ops recompute the blocks' LayerNorm and GELU outputs in
    /// the backward instead of keeping them ([`Activations::recompute`]): where memory is
    /// scarcer than those passes are dear.
    fn recompute_activations(&self) -> bool {
        false
    }
    /// Where the ops took a slower path than they could (a library missing, an engine
    /// refusing a layout), one line each, oldest first.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Allocate every buffer of `layout` (values undefined until written).
    fn prepare(&mut self, layout: &Layout) -> Result<(), Self::Error>;
    fn upload(&mut self, t: T, values: &[f32]) -> Result<(), Self::Error>;
    fn upload_index(&mut self, i: I, values: &[u32]) -> Result<(), Self::Error>;
    fn read(&mut self, t: T) -> Result<Vec<f32>, Self::Error>;
    fn fill(&mut self, t: T, value: f32) -> Result<(), Self::Error>;
    fn copy(&mut self, src: T, dst: T) -> Result<(), Self::Error>;
    /// `out` = tubelets of `clips` `[B, 3, T, H, W]` as `[B·N, P]`.
    fn patchify(
        &mut self,
        clips: T,
        dims: [usize; 5],
        tubelet: usize,
        patch: usize,
        out: T,
    ) -> Result<(), Self::Error>;
    fn gather(&mut self, g: &Gather) -> Result<(), Self::Error>;
    /// The gather's backward: `src row (b, idx[b, j]) += dst row (b, j)` (the handles are the
    /// gradients of the gather's source and destination).
    fn scatter_add(&mut self, g: &Gather) -> Result<(), Self::Error>;
    fn gemm(&mut self, g: &Gemm) -> Result<(), Self::Error>;
    /// `dst[c] += Σ_r src[r, col0 + c]` for `dst.len` columns (`src` rows of `width`).
    fn col_sum(&mut self, src: T, width: usize, col0: usize, dst: T) -> Result<(), Self::Error>;
    /// `out = LN(x)` over rows of `d`, each row's mean and 1/σ into `stats` `[rows, 2]`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &mut self,
        x: T,
        gamma: T,
        beta: T,
        eps: f32,
        d: usize,
        out: T,
        stats: T,
    ) -> Result<(), Self::Error>;
    /// `dx += ∂`, `dgamma += ∂`, `dbeta += ∂` of LN from `dout`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &mut self,
        x: T,
        stats: T,
        gamma: T,
        dout: T,
        d: usize,
        dx: T,
        dgamma: T,
        dbeta: T,
    ) -> Result<(), Self::Error>;
    /// `out [B·n, h·hd]` = attention of `qkv` `[B·n, 3·h·hd]`, row log-sum-exps into `lse`
    /// `[B, h, n]`.
    fn attention(
        &mut self,
        qkv: T,
        dims: [usize; 4],
        scale: f32,
        out: T,
        lse: T,
    ) -> Result<(), Self::Error>;
    /// `dqkv` (overwritten) from the forward's `qkv`, `out`, `lse` and `dout`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        qkv: T,
        out: T,
        dout: T,
        lse: T,
        dims: [usize; 4],
        scale: f32,
        dqkv: T,
    ) -> Result<(), Self::Error>;
    /// `out = GELU(x)` (exact, erf).
    fn gelu(&mut self, x: T, out: T) -> Result<(), Self::Error>;
    /// `grad *= GELU'(x)`.
    fn gelu_backward(&mut self, x: T, grad: T) -> Result<(), Self::Error>;
    fn leaky_relu(&mut self, x: T, slope: f32, out: T) -> Result<(), Self::Error>;
    fn leaky_relu_backward(&mut self, x: T, slope: f32, grad: T) -> Result<(), Self::Error>;
    /// `loss[0] = mean((pred - target)²)`; with `dpred`, `dpred = 2(pred - target)/len`.
    fn mse(&mut self, pred: T, target: T, dpred: Option<T>, loss: T) -> Result<(), Self::Error>;
    /// `loss[0] = mean(x)`.
    fn mean(&mut self, x: T, loss: T) -> Result<(), Self::Error>;
    /// One AdamW update of parameters `p` from gradients `g` with moments `m`, `v`.
    fn adamw(&mut self, p: T, g: T, m: T, v: T, h: &AdamW) -> Result<(), Self::Error>;
    /// `f` on the values of `t` in host memory, kept (a data-parallel run's all-reduce of the
    /// gradients). By default a read and an upload; the host ops lend the buffer itself.
    fn on_host(&mut self, t: T, f: &mut dyn FnMut(&mut [f32])) -> Result<(), Self::Error> {
        let mut v = self.read(t)?;
        f(&mut v);
        self.upload(t, &v)
    }
    /// Start averaging the f32 values of `t` across `group`'s ranks; the ops that follow
    /// leave `t` alone until [`TrainOps::all_reduce_wait`]. The outer error is the ops', the
    /// inner the group's. By default at once, through host memory ([`TrainOps::on_host`]).
    fn all_reduce_start(
        &mut self,
        t: T,
        group: &Arc<Group>,
    ) -> Result<Result<(), DistError>, Self::Error> {
        all_reduce_on_host(self, t, group)
    }
    /// Wait until every average started is in its place: the first failure among them.
    fn all_reduce_wait(&mut self) -> Result<Result<(), DistError>, Self::Error> {
        Ok(Ok(()))
    }
}

/// The parameters of one optimiser in one flat buffer: key → slice, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamTable {
    pub entries: Vec<(String, Vec<usize>, T)>,
    index: HashMap<String, usize>,
    pub len: usize,
}

impl ParamTable {
    /// `keys` of `sd` laid out one after the other in buffer `buf` (the values in that order).
    pub(super) fn build(
        sd: &StateDict,
        keys: &[String],
        buf: usize,
    ) -> Result<(Self, Vec<f32>), TrainEngineError> {
        let mut t = ParamTable::default();
        let mut values = Vec::new();
        for k in keys {
            let h = sd
                .tensors
                .get(k)
                .ok_or_else(|| TrainEngineError::Missing(k.clone()))?;
            let slice = T {
                buf,
                off: values.len(),
                len: h.data.len(),
            };
            values.extend_from_slice(&h.data);
            t.index.insert(k.clone(), t.entries.len());
            t.entries.push((k.clone(), h.shape.clone(), slice));
        }
        t.len = values.len();
        Ok((t, values))
    }

    /// The slice of `key` (its gradient or moments: [`T::of`] another buffer).
    pub fn get(&self, key: &str) -> Result<T, TrainEngineError> {
        self.index
            .get(key)
            .map(|&i| self.entries[i].2)
            .ok_or_else(|| TrainEngineError::Missing(key.into()))
    }

    /// Buffer `buf`'s values of every parameter (itself, its gradient or a moment: laid out
    /// alike) into `sd` under their names and shapes.
    pub fn read_into<O: TrainOps>(
        &self,
        ops: &mut O,
        buf: usize,
        sd: &mut StateDict,
    ) -> Result<(), O::Error> {
        let all = ops.read(self.all().of(buf))?;
        for (k, shape, t) in &self.entries {
            sd.tensors.insert(
                k.clone(),
                HostTensor::new(shape.clone(), all[t.off..t.off + t.len].to_vec()),
            );
        }
        Ok(())
    }

    /// The whole buffer.
    pub fn all(&self) -> T {
        T {
            buf: self.entries.first().map_or(0, |e| e.2.buf),
            off: 0,
            len: self.len,
        }
    }
}

/// The parameters of one transformer block (slices of the parameter buffer).
#[derive(Debug, Clone, Copy)]
struct BlockParams {
    norm1: (T, T),
    qkv: T,
    /// (q_bias, v_bias).
    qv_bias: Option<(T, T)>,
    proj: (T, T),
    norm2: (T, T),
    fc1: (T, T),
    fc2: (T, T),
}

/// One stack of blocks (the encoder's or the decoder's) with its activations.
#[derive(Debug, Clone)]
pub(super) struct Stack {
    pub(super) dim: usize,
    heads: usize,
    hidden: usize,
    scale: f32,
    /// Rows per clip.
    tokens: usize,
    blocks: Vec<BlockParams>,
    tapes: Vec<Tape>,
    /// The last block's output.
    pub(super) out: T,
    /// Backward scratch: the residual stream's gradient and per-op gradients.
    pub(super) dx: T,
    dh: T,
    datt: T,
    dqkv: T,
    dhid: T,
    /// The qkv bias (q_bias, 0, v_bias) of each block, assembled before the forward.
    qkv_bias: Vec<T>,
    /// The storage type of the tapes' product operands and outputs (and of `datt`, `dqkv`,
    /// `dhid`): the step's precision.
    act: DType,
    /// The buffer the products read weights (and the biases of act-typed outputs) from: the
    /// master buffer in f32, its bf16 copy in bf16 (laid out alike).
    wbuf: usize,
    /// The residual stream's gradient as a product operand: `dx` itself in f32, its bf16 copy
    /// in bf16.
    dxa: T,
}

/// What one block's forward keeps for its backward. With [`Activations::recompute`] the
/// LayerNorms' outputs and the MLP's GELU are not kept (None): the forward writes them to the
/// stack's backward scratch (`datt`, `dhid`: free until the backward) for the products that
/// read them, and the backward recomputes them there from the kept input, statistics and
/// pre-activation for those products' weight gradients (the same kernels on the same values:
/// the same outputs).
#[derive(Debug, Clone, Copy)]
struct Tape {
    x_in: T,
    h1: Option<T>,
    st1: T,
    qkv: T,
    att: T,
    lse: T,
    x_mid: T,
    h2: Option<T>,
    st2: T,
    pre: T,
    act: Option<T>,
}

/// Buffer numbers of the parameters, their gradients and moments.
const GEN: [usize; 4] = [0, 1, 2, 3];
const CRITIC: [usize; 4] = [4, 5, 6, 7];
const CONST: usize = 8;

/// AdamW's state of both optimisers: first and second moments of every parameter (in its
/// name and shape, as PyTorch's `exp_avg`/`exp_avg_sq`) and the updates made (generator,
/// critic), which set the bias corrections.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub exp_avg: StateDict,
    pub exp_avg_sq: StateDict,
    pub updates: [u32; 2],
}

/// Where a data-parallel step averages an update's gradients across its ranks (see
/// [`PretrainStep::step_with`]): each piece of the optimiser's gradient buffer as soon as the
/// backward has finished it, so the all-reduce of the last layers' gradients overlaps the
/// backward of the first (torch DDP's buckets), then the update's losses before the update.
pub trait GradSync<O: TrainOps> {
    /// The least a piece handed to [`GradSync::ready`] holds (f32 values), except the last:
    /// smaller pieces are gathered until they reach it (DDP's `bucket_cap_mb`).
    fn bucket_len(&self) -> usize;
    /// The gradients in `t` are final for this update: their average may start. The ops
    /// that follow leave `t` alone until [`GradSync::finish`].
    fn ready(&mut self, ops: &mut O, t: T) -> Result<(), O::Error>;
    /// Every gradient of the update (`all`, each value handed to [`GradSync::ready`] once)
    /// is final: wait for their averages, and average `losses` (the update's loss values).
    fn finish(&mut self, ops: &mut O, all: T, losses: &mut [f32]) -> Result<(), O::Error>;
}

/// The mean of `t` across `group`'s ranks at once, through host memory
/// ([`TrainOps::on_host`]): [`TrainOps::all_reduce_start`]'s default, and the fallback of ops
/// whose group cannot average their memory in place. The outer error is the ops'.
pub fn all_reduce_on_host<O: TrainOps + ?Sized>(
    ops: &mut O,
    t: T,
    group: &Group,
) -> Result<Result<(), DistError>, O::Error> {
    let mut res = Ok(());
    ops.on_host(t, &mut |v: &mut [f32]| {
        res = group.all_reduce_mean(v, "the gradients");
    })?;
    Ok(res)
}

/// One process: nothing to average.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSync;

impl<O: TrainOps> GradSync<O> for NoSync {
    fn bucket_len(&self) -> usize {
        usize::MAX
    }
    fn ready(&mut self, _: &mut O, _: T) -> Result<(), O::Error> {
        Ok(())
    }
    fn finish(&mut self, _: &mut O, _: T, _: &mut [f32]) -> Result<(), O::Error> {
        Ok(())
    }
}

/// The backward's progress through one gradient buffer, handed to a [`GradSync`] in buckets.
/// The parameters are laid out in the forward's order, so the backward finishes the buffer
/// from its end down: after each layer the gradients from that layer's first parameter to the
/// end are final.
pub(super) struct Pieces<'s, O: TrainOps> {
    sync: &'s mut dyn GradSync<O>,
    /// The whole gradient buffer of the update.
    all: T,
    /// The gradients from here to the end of `all` were handed on.
    sent: usize,
}

impl<'s, O: TrainOps> Pieces<'s, O> {
    pub(super) fn new(sync: &'s mut dyn GradSync<O>, all: T) -> Self {
        Self {
            sync,
            all,
            sent: all.len,
        }
    }

    /// The gradients of every parameter from `t`'s first value to the end of the buffer are
    /// final: hand them on once they fill a bucket.
    pub(super) fn final_from(&mut self, ops: &mut O, t: T) -> Result<(), O::Error> {
        debug_assert_eq!(t.buf, self.all.buf, "a piece of another buffer");
        let from = t.off - self.all.off;
        if from < self.sent && self.sent - from >= self.sync.bucket_len() {
            let piece = self.all.at(from, self.sent - from);
            self.sent = from;
            self.sync.ready(ops, piece)?;
        }
        Ok(())
    }

    /// Every gradient is final: the rest handed on, then the averages waited for and
    /// `losses` averaged.
    pub(super) fn finish(mut self, ops: &mut O, losses: &mut [f32]) -> Result<(), O::Error> {
        if self.sent > 0 {
            let piece = self.all.at(0, self.sent);
            self.sent = 0;
            self.sync.ready(ops, piece)?;
        }
        self.sync.finish(ops, self.all, losses)
    }
}

/// The sizes of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub batch: usize,
    pub visible: usize,
    pub masked: usize,
}

/// The pretraining step on [`TrainOps`]: buffers, parameters and optimiser state, built once
/// per batch shape.
#[derive(Debug, Clone)]
pub struct PretrainStep {
    pub shape: StepShape,
    pub layout: Layout,
    cfg_losses: LossConfig,
    betas: (f32, f32),
    eps: f32,
    weight_decay: f32,
    ln_eps: f32,
    clip: [usize; 5],
    tubelet: usize,
    patch: usize,
    tokens: usize,
    patch_dim: usize,
    gen: ParamTable,
    critic: ParamTable,
    consts: ParamTable,
    gen_values: Vec<f32>,
    critic_values: Vec<f32>,
    const_values: Vec<f32>,
    enc: Stack,
    dec: Stack,
    // activations outside the blocks
    clips: T,
    tokens_all: T,
    tv: T,
    target: T,
    e: T,
    e_st: T,
    y: T,
    zm: T,
    hd: T,
    hd_st: T,
    pred: T,
    dpred: T,
    /// Critic activations (pre-activation, activation, score) on the prediction, then (the
    /// critic update's second pass, after the first one's backward) on the target.
    c_fake: (T, T, T),
    /// The critic's score gradient, hidden gradient.
    ds: T,
    dch: T,
    // backward scratch outside the blocks
    dhd: T,
    dzm: T,
    dy: T,
    de: T,
    /// Loss slots: mean C(fake), mean C(real), rec, mean C(pred) in the generator update.
    loss: T,
    visible: I,
    masked: I,
    zeros: I,
    steps_gen: u32,
    steps_critic: u32,
    /// The generator's weights as the blocks' product operands: `GEN[0]` itself in f32, its
    /// bf16 copy (refreshed after each update) in bf16.
    wbuf: usize,
    /// The layout's first buffers hold the parameters and their state (weights, their copy,
    /// gradients, moments, constants); the rest the batch's activations and scratch.
    state_buffers: usize,
}

/// The encoder's parameter keys in buffer order: the tubelet embedding, the blocks, the final
/// norm (its positional table is a constant).
pub(super) fn encoder_keys(cfg: &MarlinConfig) -> Vec<String> {
    let mut keys = vec![
        "encoder.patch_embedding.projection.weight".to_string(),
        "encoder.patch_embedding.projection.bias".into(),
    ];
    for i in 0..cfg.encoder.depth {
        keys.extend(block_keys("encoder", i, cfg.qkv_bias));
    }
    keys.extend(["encoder.norm.weight".into(), "encoder.norm.bias".into()]);
    keys
}

pub(super) fn block_keys(prefix: &str, i: usize, qkv_bias: bool) -> Vec<String> {
    let p = format!("{prefix}.blocks.{i}");
    let mut v = vec![
        format!("{p}.norm1.weight"),
        format!("{p}.norm1.bias"),
        format!("{p}.attn.qkv.weight"),
    ];
    if qkv_bias {
        v.extend([format!("{p}.attn.q_bias"), format!("{p}.attn.v_bias")]);
    }
    v.extend([
        format!("{p}.attn.proj.weight"),
        format!("{p}.attn.proj.bias"),
        format!("{p}.norm2.weight"),
        format!("{p}.norm2.bias"),
        format!("{p}.mlp.layers.0.linear.weight"),
        format!("{p}.mlp.layers.0.linear.bias"),
        format!("{p}.mlp.layers.1.linear.weight"),
        format!("{p}.mlp.layers.1.linear.bias"),
    ]);
    v
}

fn block_params(
    t: &ParamTable,
    prefix: &str,
    i: usize,
    qkv_bias: bool,
) -> Result<BlockParams, TrainEngineError> {
    let p = format!("{prefix}.blocks.{i}");
    let g = |s: &str| t.get(&format!("{p}.{s}"));
    Ok(BlockParams {
        norm1: (g("norm1.weight")?, g("norm1.bias")?),
        qkv: g("attn.qkv.weight")?,
        qv_bias: match qkv_bias {
            true => Some((g("attn.q_bias")?, g("attn.v_bias")?)),
            false => None,
        },
        proj: (g("attn.proj.weight")?, g("attn.proj.bias")?),
        norm2: (g("norm2.weight")?, g("norm2.bias")?),
        fc1: (
            g("mlp.layers.0.linear.weight")?,
            g("mlp.layers.0.linear.bias")?,
        ),
        fc2: (
            g("mlp.layers.1.linear.weight")?,
            g("mlp.layers.1.linear.bias")?,
        ),
    })
}

impl Stack {
    #[allow(clippy::too_many_arguments)]
    /// The stack's buffers in `layout`: its residual stream, statistics and `dx`/`dh` in f32,
    /// the products' operands and outputs (LayerNorm outputs, qkv, attention, MLP) in
    /// `act.dtype`, the LayerNorm and GELU outputs per block unless `act.recompute`; its
    /// products read weights from buffer `wbuf` (see [`Stack::wbuf`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        layout: &mut Layout,
        name: &str,
        table: &ParamTable,
        cfg: &crate::model::config::StackConfig,
        hidden: usize,
        scale: f32,
        qkv_bias: bool,
        [batch, tokens]: [usize; 2],
        acts: Activations,
        wbuf: usize,
    ) -> Result<Self, TrainEngineError> {
        let act = acts.dtype;
        let (d, h) = (cfg.embed_dim, cfg.num_heads);
        let rows = batch * tokens;
        let mut blocks = Vec::new();
        let mut tapes = Vec::new();
        let mut qkv_biases = Vec::new();
        for i in 0..cfg.depth {
            blocks.push(block_params(table, name, i, qkv_bias)?);
            let f =
                |l: &mut Layout, what: &str, len: usize| l.float(format!("{name}.{i}.{what}"), len);
            let a = |l: &mut Layout, what: &str, len: usize| {
                l.float_in(format!("{name}.{i}.{what}"), len, act)
            };
            let kept = |l: &mut Layout, what: &str, len: usize| match acts.recompute {
                true => None,
                false => Some(a(l, what, len)),
            };
            tapes.push(Tape {
                x_in: f(layout, "x_in", rows * d),
                h1: kept(layout, "h1", rows * d),
                st1: f(layout, "st1", rows * 2),
                qkv: a(layout, "qkv", rows * 3 * d),
                att: a(layout, "att", rows * d),
                lse: f(layout, "lse", batch * h * tokens),
                x_mid: f(layout, "x_mid", rows * d),
                h2: kept(layout, "h2", rows * d),
                st2: f(layout, "st2", rows * 2),
                pre: a(layout, "pre", rows * hidden),
                act: kept(layout, "act", rows * hidden),
            });
            if qkv_bias {
                qkv_biases.push(a(layout, "qkv_bias", 3 * d));
            }
        }
        let f = |l: &mut Layout, what: &str, len: usize| l.float(format!("{name}.{what}"), len);
        let a =
            |l: &mut Layout, what: &str, len: usize| l.float_in(format!("{name}.{what}"), len, act);
        let dx = f(layout, "dx", rows * d);
        let dxa = match act {
            DType::F32 => dx,
            DType::Bf16 => a(layout, "dx.act", rows * d),
        };
        Ok(Stack {
            dim: d,
            heads: h,
            hidden,
            scale,
            tokens,
            blocks,
            tapes,
            out: f(layout, "out", rows * d),
            dx,
            dh: f(layout, "dh", rows * d),
            datt: a(layout, "datt", rows * d),
            dqkv: a(layout, "dqkv", rows * 3 * d),
            dhid: a(layout, "dhid", rows * hidden),
            qkv_bias: qkv_biases,
            act,
            wbuf,
            dxa,
        })
    }

    /// A weight as a product operand (its copy in the products' type).
    fn w(&self, t: T) -> T {
        t.of(self.wbuf)
    }

    /// `dxa` = `dx` in the products' type (nothing to do in f32).
    fn dx_operand<O: TrainOps>(&self, ops: &mut O) -> Result<T, O::Error> {
        if self.dxa != self.dx {
            ops.copy(self.dx, self.dxa)?;
        }
        Ok(self.dxa)
    }

    /// The input of the first block (written by the caller before [`Stack::forward`]).
    pub(super) fn input(&self) -> T {
        self.tapes.first().map_or(self.out, |t| t.x_in)
    }

    pub(super) fn forward<O: TrainOps>(
        &self,
        ops: &mut O,
        batch: usize,
        ln_eps: f32,
    ) -> Result<(), O::Error> {
        let (d, hid) = (self.dim, self.hidden);
        let rows = batch * self.tokens;
        let dims = [batch, self.tokens, self.heads, d / self.heads];
        for (i, (p, t)) in self.blocks.iter().zip(&self.tapes).enumerate() {
            let next = self.tapes.get(i + 1).map_or(self.out, |n| n.x_in);
            // Where not kept, LN1(x_in), LN2(x_mid) and GELU(pre) go to the backward's scratch.
            let h = t.h1.unwrap_or(self.datt);
            ops.layer_norm(t.x_in, p.norm1.0, p.norm1.1, ln_eps, d, h, t.st1)?;
            let bias = match p.qv_bias {
                Some((q, v)) => {
                    let b = self.qkv_bias[i];
                    ops.copy(q, b.at(0, d))?;
                    ops.fill(b.at(d, d), 0.0)?;
                    ops.copy(v, b.at(2 * d, d))?;
                    Some(b)
                }
                None => None,
            };
            let w = |t: T| self.w(t);
            ops.gemm(&linear(t.qkv, h, w(p.qkv), bias, rows, 3 * d, d, false))?;
            ops.attention(t.qkv, dims, self.scale, t.att, t.lse)?;
            ops.copy(t.x_in, t.x_mid)?;
            ops.gemm(&linear(
                t.x_mid,
                t.att,
                w(p.proj.0),
                Some(p.proj.1),
                rows,
                d,
                d,
                true,
            ))?;
            let h = t.h2.unwrap_or(self.datt);
            ops.layer_norm(t.x_mid, p.norm2.0, p.norm2.1, ln_eps, d, h, t.st2)?;
            ops.gemm(&linear(
                t.pre,
                h,
                w(p.fc1.0),
                Some(w(p.fc1.1)),
                rows,
                hid,
                d,
                false,
            ))?;
            let act = t.act.unwrap_or(self.dhid);
            ops.gelu(t.pre, act)?;
            ops.copy(t.x_mid, next)?;
            ops.gemm(&linear(
                next,
                act,
                w(p.fc2.0),
                Some(p.fc2.1),
                rows,
                d,
                hid,
                true,
            ))?;
        }
        Ok(())
    }

    /// From `self.dx` (the gradient of the stack's output) to the gradient of its input (left
    /// in `self.dx`), the weights' gradients accumulated into buffer `grads`, last block
    /// first; each block's are then final and handed to `pieces`.
    pub(super) fn backward<O: TrainOps>(
        &self,
        ops: &mut O,
        batch: usize,
        ln_eps: f32,
        grads: usize,
        pieces: &mut Pieces<'_, O>,
    ) -> Result<(), O::Error> {
        let (d, hid) = (self.dim, self.hidden);
        let rows = batch * self.tokens;
        let dims = [batch, self.tokens, self.heads, d / self.heads];
        let g = |t: T| t.of(grads);
        for (p, t) in self.blocks.iter().zip(&self.tapes).rev() {
            let w = |t: T| self.w(t);
            // x_out = x_mid + fc2(GELU(fc1(LN2(x_mid)))): dx flows on, and into the MLP.
            let dxa = self.dx_operand(ops)?;
            let (fc2, fc1) = ((p.fc2, w(p.fc2.0)), (p.fc1, w(p.fc1.0)));
            let lin = |dy, a, wb, da, n, k| LinearBackward {
                dy,
                a,
                wb,
                da,
                rows,
                n,
                k,
                grads,
            };
            // fc2's input GELU(pre), where not kept recomputed into dhid: its weight gradient
            // reads it before its input gradient overwrites dhid.
            let act = match t.act {
                Some(a) => a,
                None => {
                    ops.gelu(t.pre, self.dhid)?;
                    self.dhid
                }
            };
            lin([self.dx, dxa], act, fc2, self.dhid, d, hid).run(ops)?;
            ops.gelu_backward(t.pre, self.dhid)?;
            // fc1's input LN2(x_mid), where not kept recomputed into datt (free until the
            // attention's part).
            let h = match t.h2 {
                Some(h) => h,
                None => {
                    ops.layer_norm(t.x_mid, p.norm2.0, p.norm2.1, ln_eps, d, self.datt, t.st2)?;
                    self.datt
                }
            };
            lin([self.dhid; 2], h, fc1, self.dh, hid, d).run(ops)?;
            ops.layer_norm_backward(
                t.x_mid,
                t.st2,
                p.norm2.0,
                self.dh,
                d,
                self.dx,
                g(p.norm2.0),
                g(p.norm2.1),
            )?;
            // x_mid = x_in + proj(attention(qkv(LN1(x_in)))).
            let dxa = self.dx_operand(ops)?;
            let proj = (p.proj, w(p.proj.0));
            lin([self.dx, dxa], t.att, proj, self.datt, d, d).run(ops)?;
            ops.attention_backward(t.qkv, t.att, self.datt, t.lse, dims, self.scale, self.dqkv)?;
            // qkv's input LN1(x_in), where not kept recomputed into datt (read by the
            // attention's backward just above, free now). Then the qkv product's weight and
            // input gradients; q_bias and v_bias from the q and v columns (k has no bias).
            let h = match t.h1 {
                Some(h) => h,
                None => {
                    ops.layer_norm(t.x_in, p.norm1.0, p.norm1.1, ln_eps, d, self.datt, t.st1)?;
                    self.datt
                }
            };
            ops.gemm(&weight_grad(g(p.qkv), self.dqkv, h, [3 * d, d, rows]))?;
            if let Some((q, v)) = p.qv_bias {
                ops.col_sum(self.dqkv, 3 * d, 0, g(q))?;
                ops.col_sum(self.dqkv, 3 * d, 2 * d, g(v))?;
            }
            ops.gemm(&input_grad(
                self.dh,
                self.dqkv,
                w(p.qkv),
                [rows, 3 * d, d],
                false,
            ))?;
            ops.layer_norm_backward(
                t.x_in,
                t.st1,
                p.norm1.0,
                self.dh,
                d,
                self.dx,
                g(p.norm1.0),
                g(p.norm1.1),
            )?;
            // norm1.weight is the block's first parameter.
            pieces.final_from(ops, g(p.norm1.0))?;
        }
        Ok(())
    }
}

/// `d [rows, n] (+)= a [rows, k] · Wᵀ + bias` for a Linear's weight `w` `[n, k]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    d: T,
    a: T,
    w: T,
    bias: Option<T>,
    rows: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Gemm {
    Gemm {
        d,
        a,
        ta: false,
        b: w,
        tb: true,
        m: rows,
        n,
        k,
        bias,
        accumulate,
    }
}

/// A Linear's weight gradient `dw [out, inp] += dyᵀ · x` from `dy [rows, out]` and its input
/// `x [rows, inp]`.
pub(super) fn weight_grad(dw: T, dy: T, x: T, [out, inp, rows]: [usize; 3]) -> Gemm {
    Gemm {
        d: dw,
        a: dy,
        ta: true,
        b: x,
        tb: false,
        m: out,
        n: inp,
        k: rows,
        bias: None,
        accumulate: true,
    }
}

/// A Linear's input gradient `dx [rows, inp] (+)= dy · w` from `dy [rows, out]` and its weight
/// `w [out, inp]`.
pub(super) fn input_grad(
    dx: T,
    dy: T,
    w: T,
    [rows, out, inp]: [usize; 3],
    accumulate: bool,
) -> Gemm {
    Gemm {
        d: dx,
        a: dy,
        ta: false,
        b: w,
        tb: false,
        m: rows,
        n: inp,
        k: out,
        bias: None,
        accumulate,
    }
}

/// A Linear's backward from `dy` `[rows, n]`: `dw += dyᵀ·a`, `db += Σ dy` (gradients in buffer
/// `grads`), and `da = dy · W` `[rows, k]` (overwritten).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward<O: TrainOps>(
    ops: &mut O,
    dy: T,
    a: T,
    (w, b): (T, T),
    da: T,
    rows: usize,
    n: usize,
    k: usize,
    grads: usize,
) -> Result<(), O::Error> {
    LinearBackward {
        dy: [dy; 2],
        a,
        wb: ((w, b), w),
        da,
        rows,
        n,
        k,
        grads,
    }
    .run(ops)
}

/// A Linear's backward whose product operands may be copies in another type: `dy` (the
/// gradient summed into the bias, and as the products' operand), `wb` ((the master weight and
/// bias: their gradients' places), the weight as the products' operand).
#[derive(Debug, Clone, Copy)]
struct LinearBackward {
    dy: [T; 2],
    a: T,
    wb: ((T, T), T),
    da: T,
    rows: usize,
    n: usize,
    k: usize,
    grads: usize,
}

impl LinearBackward {
    fn run<O: TrainOps>(self, ops: &mut O) -> Result<(), O::Error> {
        let Self {
            dy: [dy_sum, dy],
            a,
            wb: ((w, b), w_op),
            da,
            rows,
            n,
            k,
            grads,
        } = self;
        ops.gemm(&weight_grad(w.of(grads), dy, a, [n, k, rows]))?;
        ops.col_sum(dy_sum, n, 0, b.of(grads))?;
        ops.gemm(&input_grad(da, dy, w_op, [rows, n, k], false))
    }
}

/// The master weights `all` into their copy in the products' type in buffer `wbuf`, after they
/// changed (nothing when `wbuf` is the master buffer: an f32 step).
pub(super) fn refresh_copy<O: TrainOps>(ops: &mut O, all: T, wbuf: usize) -> Result<(), O::Error> {
    match all.buf == wbuf {
        true => Ok(()),
        false => ops.copy(all, all.of(wbuf)),
    }
}

pub(super) fn shape_check(
    sd: &StateDict,
    key: &str,
    want: &[usize],
) -> Result<(), TrainEngineError> {
    let h: &HostTensor = sd
        .tensors
        .get(key)
        .ok_or_else(|| TrainEngineError::Missing(key.into()))?;
    if h.data.len() != want.iter().product::<usize>() {
        return Err(TrainEngineError::Shape {
            key: key.into(),
            got: h.shape.clone(),
            want: want.to_vec(),
        });
    }
    Ok(())
}

impl PretrainStep {
    /// Whether the engine covers `cfg`'s model with the weights of `sd` and `losses`: layer
    /// scale, the gradient penalty and a projection bias stay on burn's path (an error here).
    pub fn supports(
        cfg: &MarlinConfig,
        sd: &StateDict,
        losses: LossConfig,
    ) -> Result<(), TrainEngineError> {
        if cfg.init_values > 0.0 {
            return Err(TrainEngineError::Unsupported(
                "layer scale (init_values > 0)",
            ));
        }
        if losses.gp_weight > 0.0 {
            return Err(TrainEngineError::Unsupported(
                "the gradient penalty (gp_weight > 0)",
            ));
        }
        if sd.tensors.contains_key("enc_dec_proj.bias") {
            return Err(TrainEngineError::Unsupported("a bias in enc_dec_proj"));
        }
        Ok(())
    }

    /// The step for `cfg`'s model with the weights of `sd` (the peer's names: the generator
    /// and the critic), batches of `shape`, and `losses`, in f32. Layer scale, the gradient
    /// penalty and a projection bias stay on burn's path (an error here).
    pub fn new(
        cfg: &MarlinConfig,
        sd: &StateDict,
        shape: StepShape,
        losses: LossConfig,
    ) -> Result<Self, TrainEngineError> {
        Self::new_in(cfg, sd, shape, losses, DType::F32)
    }

    /// [`Self::new`] with the transformer blocks' activations kept as `act` says (a [`DType`],
    /// or [`Activations::of`] the ops: their [`TrainOps::activation_dtype`], and whether they
    /// recompute the LayerNorm and GELU outputs). In bf16 the blocks' products take bf16 operands (the
    /// generator's weights through a bf16 copy) with f32 sums; the residual stream, the
    /// LayerNorm statistics, the log-sum-exps, the gradients of the residual stream and of
    /// every weight, the master weights and AdamW's moments stay f32, as do the products
    /// outside the blocks (the tubelet embedding, the encoder-decoder projection, the head and
    /// the critic: under 5% of the step's arithmetic) and the losses.
    pub fn new_in(
        cfg: &MarlinConfig,
        sd: &StateDict,
        shape: StepShape,
        losses: LossConfig,
        act: impl Into<Activations>,
    ) -> Result<Self, TrainEngineError> {
        let acts = act.into();
        let act = acts.dtype;
        Self::supports(cfg, sd, losses)?;
        let (de, dd) = (cfg.encoder.embed_dim, cfg.decoder.embed_dim);
        let (n, p) = (cfg.num_patches(), cfg.patch_dim());
        let StepShape {
            batch,
            visible: nv,
            masked: nm,
        } = shape;
        if nv + nm != n {
            return Err(TrainEngineError::Batch {
                got: batch,
                vis: nv,
                want: batch,
                want_vis: n - nm,
            });
        }
        let (he, hdec) = (cfg.mlp_hidden(de), cfg.mlp_hidden(dd));
        shape_check(sd, "encoder.patch_embedding.projection.weight", &[de, p])?;
        shape_check(sd, "enc_dec_proj.weight", &[dd, de])?;
        shape_check(sd, "decoder.head.weight", &[p, dd])?;
        shape_check(sd, "decoder.mask_token", &[dd])?;
        let critic_w = sd
            .tensors
            .get("discriminator.layers.0.linear.weight")
            .ok_or_else(|| {
                TrainEngineError::Missing("discriminator.layers.0.linear.weight".into())
            })?;
        let hc = critic_w.data.len() / p;
        shape_check(sd, "discriminator.layers.1.linear.weight", &[1, hc])?;

        let mut gen_keys = encoder_keys(cfg);
        gen_keys.extend(["enc_dec_proj.weight".into(), "decoder.mask_token".into()]);
        for i in 0..cfg.decoder.depth {
            gen_keys.extend(block_keys("decoder", i, cfg.qkv_bias));
        }
        gen_keys.extend([
            "decoder.norm.weight".into(),
            "decoder.norm.bias".into(),
            "decoder.head.weight".into(),
            "decoder.head.bias".into(),
        ]);
        let critic_keys: Vec<String> = [
            "discriminator.layers.0.linear.weight",
            "discriminator.layers.0.linear.bias",
            "discriminator.layers.1.linear.weight",
            "discriminator.layers.1.linear.bias",
        ]
        .map(String::from)
        .to_vec();
        let const_keys: Vec<String> = ["encoder.pos_embedding.emb", "decoder.pos_embedding.emb"]
            .map(String::from)
            .to_vec();
        let (gen, gen_values) = ParamTable::build(sd, &gen_keys, GEN[0])?;
        let (critic, critic_values) = ParamTable::build(sd, &critic_keys, CRITIC[0])?;
        let (consts, const_values) = ParamTable::build(sd, &const_keys, CONST)?;
        shape_check(sd, "encoder.pos_embedding.emb", &[n, de])?;
        shape_check(sd, "decoder.pos_embedding.emb", &[n, dd])?;

        let mut layout = Layout::default();
        for (name, len) in [
            ("gen", gen.len),
            ("gen.grad", gen.len),
            ("gen.m", gen.len),
            ("gen.v", gen.len),
            ("critic", critic.len),
            ("critic.grad", critic.len),
            ("critic.m", critic.len),
            ("critic.v", critic.len),
            ("const", consts.len),
        ] {
            layout.float(name, len);
        }
        let wbuf = match act {
            DType::F32 => GEN[0],
            DType::Bf16 => layout.float_in("gen.act", gen.len, act).buf,
        };
        let state_buffers = layout.floats.len();
        let scale =
            |d: usize, h: usize| crate::model::block::attention_scale(cfg.qk_scale, d, h) as f32;
        let enc = Stack::new(
            &mut layout,
            "encoder",
            &gen,
            &cfg.encoder,
            he,
            scale(de, cfg.encoder.num_heads),
            cfg.qkv_bias,
            [batch, nv],
            acts,
            wbuf,
        )?;
        let dec = Stack::new(
            &mut layout,
            "decoder",
            &gen,
            &cfg.decoder,
            hdec,
            scale(dd, cfg.decoder.num_heads),
            cfg.qkv_bias,
            [batch, n],
            acts,
            wbuf,
        )?;
        let (rv, rm) = (batch * nv, batch * nm);
        let mut f = |name: &str, len: usize| layout.float(name, len);
        let clip = [batch, 3, cfg.clip_frames, cfg.img_size, cfg.img_size];
        let clips = f("clips", clip.iter().product());
        let tokens_all = f("tokens", batch * n * p);
        let tv = f("tv", rv * p);
        let target = f("target", rm * p);
        let e = f("e", rv * de);
        let e_st = f("e_st", rv * 2);
        let y = f("y", rv * dd);
        let zm = f("zm", rm * dd);
        let hd = f("hd", rm * dd);
        let hd_st = f("hd_st", rm * 2);
        let pred = f("pred", rm * p);
        // The prediction's gradient lives in the tokens' buffer: the forward reads the tokens
        // (into the visible tokens and the target) before the losses write that gradient,
        // and a forward run again makes them again from the clips.
        let dpred = tokens_all.at(0, rm * p);
        // The critic's activation lives in its hidden gradient's buffer: a backward reads it
        // (the second layer's weight gradient) before it writes that gradient there.
        let dch = f("dch", rm * hc);
        let c_fake = (f("c_fake.h", rm * hc), dch, f("c_fake.s", rm));
        let ds = f("ds", rm);
        let dhd = f("dhd", rm * dd);
        let dzm = f("dzm", rm * dd);
        let dy = f("dy", rv * dd);
        let de_ = f("de", rv * de);
        let loss = f("loss", 4);
        let visible = layout.index("visible", rv);
        let masked = layout.index("masked", rm);
        let zeros = layout.index("zeros", rm);
        let (betas, eps) = crate::train::adam_betas_eps(cfg);
        Ok(Self {
            shape,
            layout,
            cfg_losses: losses,
            betas: (betas[0] as f32, betas[1] as f32),
            eps: eps as f32,
            weight_decay: cfg.weight_decay as f32,
            ln_eps: crate::model::load::LN_EPS as f32,
            clip,
            tubelet: cfg.tubelet_size,
            patch: cfg.patch_size,
            tokens: n,
            patch_dim: p,
            gen,
            critic,
            consts,
            gen_values,
            critic_values,
            const_values,
            enc,
            dec,
            clips,
            tokens_all,
            tv,
            target,
            e,
            e_st,
            y,
            zm,
            hd,
            hd_st,
            pred,
            dpred,
            c_fake,
            ds,
            dch,
            dhd,
            dzm,
            dy,
            de: de_,
            loss,
            visible,
            masked,
            zeros,
            steps_gen: 0,
            steps_critic: 0,
            wbuf,
            state_buffers,
        })
    }

    /// Bytes of the step's float buffers: (the parameters and their state: weights, their
    /// product copy, gradients, AdamW's moments, constants; the batch's activations and
    /// scratch).
    pub fn buffer_bytes(&self) -> (usize, usize) {
        let bytes = |b: usize| self.layout.bytes(b);
        let n = self.layout.floats.len();
        (
            (0..self.state_buffers).map(bytes).sum(),
            (self.state_buffers..n).map(bytes).sum(),
        )
    }

    /// The storage type of the blocks' activations.
    pub fn activation_dtype(&self) -> DType {
        self.enc.act
    }

    fn refresh_weights<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        refresh_copy(ops, self.gen.all(), self.wbuf)
    }

    /// Allocate `ops`' buffers, upload the weights and zero the optimiser state.
    pub fn load<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        ops.set_batch(self.shape.batch);
        ops.prepare(&self.layout)?;
        ops.upload(self.gen.all(), &self.gen_values)?;
        ops.upload(self.critic.all(), &self.critic_values)?;
        ops.upload(self.consts.all(), &self.const_values)?;
        self.refresh_weights(ops)?;
        // The moments, and the gradients and losses (an update reads its own only, but
        // `gradients()` and a data-parallel reduce see them all).
        for b in [GEN[1], GEN[2], GEN[3]] {
            ops.fill(self.gen.all().of(b), 0.0)?;
        }
        for b in [CRITIC[1], CRITIC[2], CRITIC[3]] {
            ops.fill(self.critic.all().of(b), 0.0)?;
        }
        ops.fill(self.loss, 0.0)?;
        ops.upload_index(self.zeros, &vec![0; self.zeros.len])
    }

    fn p(&self, key: &str) -> T {
        // Every key asked for here was checked when the step was built.
        self.gen
            .get(key)
            .or_else(|_| self.critic.get(key))
            .or_else(|_| self.consts.get(key))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The generator's forward from the clips and mask indices in the ops' buffers to `pred`
    /// (and `target`), keeping every activation its backward needs.
    fn generator_forward<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        let StepShape {
            batch,
            visible: nv,
            masked: nm,
        } = self.shape;
        let (n, p) = (self.tokens, self.patch_dim);
        let (de, dd) = (self.enc.dim, self.dec.dim);
        let (rv, rm) = (batch * nv, batch * nm);
        ops.patchify(
            self.clips,
            self.clip,
            self.tubelet,
            self.patch,
            self.tokens_all,
        )?;
        let rows = |t: T, per_batch: usize, start: usize| Rows {
            t,
            per_batch,
            start,
        };
        let gather =
            |src: Rows, idx: Option<I>, dst: Rows, count: usize, width: usize, accumulate: bool| {
                Gather {
                    src,
                    idx,
                    dst,
                    batch,
                    count,
                    width,
                    accumulate,
                }
            };
        ops.gather(&gather(
            rows(self.tokens_all, n, 0),
            Some(self.visible),
            rows(self.tv, nv, 0),
            nv,
            p,
            false,
        ))?;
        ops.gather(&gather(
            rows(self.tokens_all, n, 0),
            Some(self.masked),
            rows(self.target, nm, 0),
            nm,
            p,
            false,
        ))?;
        // The tubelet embedding of the visible tubelets, plus their positions.
        let x = self.enc.input();
        ops.gemm(&linear(
            x,
            self.tv,
            self.p("encoder.patch_embedding.projection.weight"),
            Some(self.p("encoder.patch_embedding.projection.bias")),
            rv,
            de,
            p,
            false,
        ))?;
        let pos = self.p("encoder.pos_embedding.emb");
        ops.gather(&gather(
            rows(pos, 0, 0),
            Some(self.visible),
            rows(x, nv, 0),
            nv,
            de,
            true,
        ))?;
        self.enc.forward(ops, batch, self.ln_eps)?;
        ops.layer_norm(
            self.enc.out,
            self.p("encoder.norm.weight"),
            self.p("encoder.norm.bias"),
            self.ln_eps,
            de,
            self.e,
            self.e_st,
        )?;
        ops.gemm(&linear(
            self.y,
            self.e,
            self.p("enc_dec_proj.weight"),
            None,
            rv,
            dd,
            de,
            false,
        ))?;
        // The decoder's input: projected visible tokens, then mask tokens, each with positions.
        let z = self.dec.input();
        let dpos = self.p("decoder.pos_embedding.emb");
        ops.gather(&gather(
            rows(self.y, nv, 0),
            None,
            rows(z, n, 0),
            nv,
            dd,
            false,
        ))?;
        ops.gather(&gather(
            rows(dpos, 0, 0),
            Some(self.visible),
            rows(z, n, 0),
            nv,
            dd,
            true,
        ))?;
        let mask_token = self.p("decoder.mask_token");
        ops.gather(&gather(
            rows(mask_token, 0, 0),
            Some(self.zeros),
            rows(z, n, nv),
            nm,
            dd,
            false,
        ))?;
        ops.gather(&gather(
            rows(dpos, 0, 0),
            Some(self.masked),
            rows(z, n, nv),
            nm,
            dd,
            true,
        ))?;
        self.dec.forward(ops, batch, self.ln_eps)?;
        ops.gather(&gather(
            rows(self.dec.out, n, nv),
            None,
            rows(self.zm, nm, 0),
            nm,
            dd,
            false,
        ))?;
        ops.layer_norm(
            self.zm,
            self.p("decoder.norm.weight"),
            self.p("decoder.norm.bias"),
            self.ln_eps,
            dd,
            self.hd,
            self.hd_st,
        )?;
        ops.gemm(&linear(
            self.pred,
            self.hd,
            self.p("decoder.head.weight"),
            Some(self.p("decoder.head.bias")),
            rm,
            p,
            dd,
            false,
        ))
    }

    /// The critic's scores of `x` `[B·nm, P]` into `(h, a, s)`.
    fn critic_forward<O: TrainOps>(
        &self,
        ops: &mut O,
        x: T,
        (h, a, s): (T, T, T),
    ) -> Result<(), O::Error> {
        let rm = self.shape.batch * self.shape.masked;
        let hc = h.len / rm.max(1);
        ops.gemm(&linear(
            h,
            x,
            self.p("discriminator.layers.0.linear.weight"),
            Some(self.p("discriminator.layers.0.linear.bias")),
            rm,
            hc,
            self.patch_dim,
            false,
        ))?;
        ops.leaky_relu(h, 0.01, a)?;
        ops.gemm(&linear(
            s,
            a,
            self.p("discriminator.layers.1.linear.weight"),
            Some(self.p("discriminator.layers.1.linear.bias")),
            rm,
            1,
            hc,
            false,
        ))
    }

    /// From `self.ds` (d loss / d score), back through the critic of `x`: the critic's weight
    /// gradients (`weights`) and, with `dx`, `dx += ∂/∂x`.
    fn critic_backward<O: TrainOps>(
        &self,
        ops: &mut O,
        x: T,
        (h, a, _): (T, T, T),
        weights: bool,
        dx: Option<T>,
    ) -> Result<(), O::Error> {
        let rm = self.shape.batch * self.shape.masked;
        let hc = h.len / rm.max(1);
        let w1 = self.p("discriminator.layers.0.linear.weight");
        let w2 = self.p("discriminator.layers.1.linear.weight");
        let g = CRITIC[1];
        if weights {
            ops.gemm(&weight_grad(w2.of(g), self.ds, a, [1, hc, rm]))?;
            ops.col_sum(
                self.ds,
                1,
                0,
                self.p("discriminator.layers.1.linear.bias").of(g),
            )?;
        }
        // d hidden = ds · W2 [rm, 1]·[1, hc], through LeakyReLU.
        ops.gemm(&input_grad(self.dch, self.ds, w2, [rm, 1, hc], false))?;
        ops.leaky_relu_backward(h, 0.01, self.dch)?;
        if weights {
            ops.gemm(&weight_grad(
                w1.of(g),
                self.dch,
                x,
                [hc, self.patch_dim, rm],
            ))?;
            ops.col_sum(
                self.dch,
                hc,
                0,
                self.p("discriminator.layers.0.linear.bias").of(g),
            )?;
        }
        if let Some(dx) = dx {
            ops.gemm(&input_grad(
                dx,
                self.dch,
                w1,
                [rm, hc, self.patch_dim],
                true,
            ))?;
        }
        Ok(())
    }

    /// The generator's backward from `self.dpred` to every generator gradient, each layer's
    /// handed to `pieces` once final.
    fn generator_backward<O: TrainOps>(
        &self,
        ops: &mut O,
        pieces: &mut Pieces<'_, O>,
    ) -> Result<(), O::Error> {
        let StepShape {
            batch,
            visible: nv,
            masked: nm,
        } = self.shape;
        let (n, p) = (self.tokens, self.patch_dim);
        let (de, dd) = (self.enc.dim, self.dec.dim);
        let (rv, rm) = (batch * nv, batch * nm);
        let g = GEN[1];
        let head = (self.p("decoder.head.weight"), self.p("decoder.head.bias"));
        linear_backward(ops, self.dpred, self.hd, head, self.dhd, rm, p, dd, g)?;
        pieces.final_from(ops, head.0.of(g))?;
        ops.fill(self.dzm, 0.0)?;
        let (nw, nb) = (self.p("decoder.norm.weight"), self.p("decoder.norm.bias"));
        ops.layer_norm_backward(
            self.zm,
            self.hd_st,
            nw,
            self.dhd,
            dd,
            self.dzm,
            nw.of(g),
            nb.of(g),
        )?;
        pieces.final_from(ops, nw.of(g))?;
        // Only the masked rows reach the head: the decoder's output gradient is zero elsewhere.
        let rows = |t: T, per_batch: usize, start: usize| Rows {
            t,
            per_batch,
            start,
        };
        let gather = |src: Rows, idx: Option<I>, dst: Rows, count: usize, width: usize| Gather {
            src,
            idx,
            dst,
            batch,
            count,
            width,
            accumulate: true,
        };
        ops.fill(self.dec.dx, 0.0)?;
        ops.scatter_add(&gather(
            rows(self.dec.dx, n, nv),
            None,
            rows(self.dzm, nm, 0),
            nm,
            dd,
        ))?;
        self.dec.backward(ops, batch, self.ln_eps, g, pieces)?;
        // The decoder's input: visible rows to the projection, masked rows to the mask token.
        ops.fill(self.dy, 0.0)?;
        ops.scatter_add(&gather(
            rows(self.dy, nv, 0),
            None,
            rows(self.dec.dx, n, 0),
            nv,
            dd,
        ))?;
        let mask_token = self.p("decoder.mask_token").of(g);
        ops.scatter_add(&gather(
            rows(mask_token, 0, 0),
            Some(self.zeros),
            rows(self.dec.dx, n, nv),
            nm,
            dd,
        ))?;
        let proj = self.p("enc_dec_proj.weight");
        ops.gemm(&weight_grad(proj.of(g), self.dy, self.e, [dd, de, rv]))?;
        ops.gemm(&input_grad(self.de, self.dy, proj, [rv, dd, de], false))?;
        // enc_dec_proj.weight, then the mask token.
        pieces.final_from(ops, proj.of(g))?;
        ops.fill(self.enc.dx, 0.0)?;
        let (nw, nb) = (self.p("encoder.norm.weight"), self.p("encoder.norm.bias"));
        ops.layer_norm_backward(
            self.enc.out,
            self.e_st,
            nw,
            self.de,
            de,
            self.enc.dx,
            nw.of(g),
            nb.of(g),
        )?;
        pieces.final_from(ops, nw.of(g))?;
        self.enc.backward(ops, batch, self.ln_eps, g, pieces)?;
        // The tubelet embedding (the positions are constants).
        let w = self.p("encoder.patch_embedding.projection.weight");
        let b = self.p("encoder.patch_embedding.projection.bias");
        ops.gemm(&weight_grad(w.of(g), self.enc.dx, self.tv, [de, p, rv]))?;
        ops.col_sum(self.enc.dx, de, 0, b.of(g))
    }

    fn adam(&self, lr: f64, step: u32) -> AdamW {
        AdamW {
            lr: lr as f32,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step,
        }
    }

    /// Upload a batch: clips `[B, 3, T, H, W]` and its mask indices.
    pub fn upload_batch<O: TrainOps>(
        &self,
        ops: &mut O,
        clips: &[f32],
        idx: &MaskIndices,
    ) -> Result<(), TrainEngineError> {
        let StepShape {
            batch,
            visible,
            masked,
        } = self.shape;
        let (nv, nm) = (
            idx.visible.len() / idx.batch.max(1),
            idx.masked.len() / idx.batch.max(1),
        );
        if idx.batch != batch || nv != visible || nm != masked || clips.len() != self.clips.len {
            return Err(TrainEngineError::Batch {
                got: idx.batch,
                vis: nv,
                want: batch,
                want_vis: visible,
            });
        }
        let dev = |e: O::Error| TrainEngineError::Device(e.to_string());
        let u32s = |v: &[i64]| v.iter().map(|&i| i as u32).collect::<Vec<u32>>();
        ops.upload(self.clips, clips).map_err(dev)?;
        ops.upload_index(self.visible, &u32s(&idx.visible))
            .map_err(dev)?;
        ops.upload_index(self.masked, &u32s(&idx.masked))
            .map_err(dev)
    }

    /// The gradients of the critic loss (`critic.grad`), from the generator's prediction of
    /// the uploaded batch; the loss slots 0 and 1 hold mean C(fake) and mean C(real).
    pub fn critic_gradients<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        let rm = self.shape.batch * self.shape.masked;
        self.generator_forward(ops)?;
        ops.fill(self.critic.all().of(CRITIC[1]), 0.0)?;
        // The prediction's pass, then the target's in the same buffers.
        self.critic_forward(ops, self.pred, self.c_fake)?;
        ops.mean(self.c_fake.2, self.loss.at(0, 1))?;
        ops.fill(self.ds, 1.0 / rm as f32)?;
        self.critic_backward(ops, self.pred, self.c_fake, true, None)?;
        self.critic_forward(ops, self.target, self.c_fake)?;
        ops.mean(self.c_fake.2, self.loss.at(1, 1))?;
        ops.fill(self.ds, -1.0 / rm as f32)?;
        self.critic_backward(ops, self.target, self.c_fake, true, None)
    }

    /// The gradients of the generator loss (`gen.grad`) with the current critic; loss slots 2
    /// and 3 hold the reconstruction MSE and mean C(pred).
    pub fn generator_gradients<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        self.generator_forward(ops)?;
        let mut one = NoSync;
        let mut pieces = Pieces::new(&mut one, self.gen.all().of(GEN[1]));
        self.generator_gradients_on_tape(ops, &mut pieces)
    }

    /// [`Self::generator_gradients`] from the activations the last generator forward kept
    /// (which must be of the current generator weights and batch), each layer's handed to
    /// `pieces` once final.
    fn generator_gradients_on_tape<O: TrainOps>(
        &self,
        ops: &mut O,
        pieces: &mut Pieces<'_, O>,
    ) -> Result<(), O::Error> {
        let rm = self.shape.batch * self.shape.masked;
        ops.fill(self.gen.all().of(GEN[1]), 0.0)?;
        ops.mse(self.pred, self.target, Some(self.dpred), self.loss.at(2, 1))?;
        if self.cfg_losses.adv_loss {
            self.critic_forward(ops, self.pred, self.c_fake)?;
            ops.mean(self.c_fake.2, self.loss.at(3, 1))?;
            ops.fill(self.ds, -(self.cfg_losses.adv_weight as f32) / rm as f32)?;
            self.critic_backward(ops, self.pred, self.c_fake, false, Some(self.dpred))?;
        }
        self.generator_backward(ops, pieces)
    }

    /// One training step on the uploaded batch at learning rate `lr`: `d_steps` critic
    /// updates, then `g_steps` generator updates, as [`crate::train::Pretrainer::step`]. A
    /// non-finite loss skips its update.
    pub fn step<O: TrainOps>(&mut self, ops: &mut O, lr: f64) -> Result<StepLosses, O::Error> {
        self.step_with(ops, lr, &mut NoSync)
    }

    /// [`Self::step`] with each update's gradients handed to `sync` as the backward finishes
    /// them, and its loss values before the update: a data-parallel run averages both across
    /// its ranks there, so every rank makes the same update (or skips it).
    pub fn step_with<O: TrainOps>(
        &mut self,
        ops: &mut O,
        lr: f64,
        sync: &mut dyn GradSync<O>,
    ) -> Result<StepLosses, O::Error> {
        let mut out = StepLosses::default();
        let l = self.cfg_losses;
        // Whether the generator's activations are those of its current weights on this batch:
        // the critic update's forward is then the generator update's too (the critic's updates
        // leave the generator alone), one generator forward per step instead of two.
        let mut tape = false;
        if l.adv_loss {
            for _ in 0..l.d_steps {
                self.critic_gradients(ops)?;
                tape = true;
                let mut v = ops.read(self.loss.at(0, 2))?;
                let c = self.critic.all();
                // The critic's gradients are small: one piece after its backward.
                Pieces::new(sync, c.of(CRITIC[1])).finish(ops, &mut v)?;
                out.d_loss = v[0] as f64 - v[1] as f64;
                if !out.d_loss.is_finite() {
                    out.skipped = true;
                    continue;
                }
                self.steps_critic += 1;
                let h = self.adam(lr, self.steps_critic);
                ops.adamw(c, c.of(CRITIC[1]), c.of(CRITIC[2]), c.of(CRITIC[3]), &h)?;
            }
        }
        for _ in 0..l.g_steps {
            let g = self.gen.all();
            let mut pieces = Pieces::new(sync, g.of(GEN[1]));
            if !std::mem::take(&mut tape) {
                self.generator_forward(ops)?;
            }
            self.generator_gradients_on_tape(ops, &mut pieces)?;
            let mut v = ops.read(self.loss.at(2, 2))?;
            pieces.finish(ops, &mut v)?;
            out.rec = v[0] as f64;
            out.adv = if l.adv_loss {
                -(v[1] as f64) * l.adv_weight
            } else {
                0.0
            };
            out.g_loss = out.rec + out.adv;
            if !out.g_loss.is_finite() {
                out.skipped = true;
                continue;
            }
            self.steps_gen += 1;
            let h = self.adam(lr, self.steps_gen);
            ops.adamw(g, g.of(GEN[1]), g.of(GEN[2]), g.of(GEN[3]), &h)?;
            self.refresh_weights(ops)?;
        }
        Ok(out)
    }

    /// The optimisers' state: AdamW's moments in the parameters' names and shapes, and the
    /// updates made.
    pub fn optimizer_state<O: TrainOps>(&self, ops: &mut O) -> Result<OptimizerState, O::Error> {
        Ok(OptimizerState {
            exp_avg: self.tables(ops, [GEN[2], CRITIC[2], usize::MAX])?,
            exp_avg_sq: self.tables(ops, [GEN[3], CRITIC[3], usize::MAX])?,
            updates: [self.steps_gen, self.steps_critic],
        })
    }

    /// Continue from `state` (after [`Self::load`]): every parameter's moments must be there,
    /// in its shape.
    pub fn load_optimizer_state<O: TrainOps>(
        &mut self,
        ops: &mut O,
        state: &OptimizerState,
    ) -> Result<(), TrainEngineError> {
        let dev = |e: O::Error| TrainEngineError::Device(e.to_string());
        let tables = [(&self.gen, GEN), (&self.critic, CRITIC)];
        for (table, bufs) in tables {
            for (k, shape, t) in &table.entries {
                for (sd, buf) in [(&state.exp_avg, bufs[2]), (&state.exp_avg_sq, bufs[3])] {
                    let h = sd
                        .tensors
                        .get(k)
                        .ok_or_else(|| TrainEngineError::Missing(format!("{k} (its moments)")))?;
                    if h.shape != *shape {
                        return Err(TrainEngineError::Shape {
                            key: k.clone(),
                            got: h.shape.clone(),
                            want: shape.clone(),
                        });
                    }
                    ops.upload(t.of(buf), &h.data).map_err(dev)?;
                }
            }
        }
        [self.steps_gen, self.steps_critic] = state.updates;
        Ok(())
    }

    /// The current weights (generator and critic, with the positional tables) in the peer's
    /// names and shapes.
    pub fn state_dict<O: TrainOps>(&self, ops: &mut O) -> Result<StateDict, O::Error> {
        self.tables(ops, [GEN[0], CRITIC[0], CONST])
    }

    /// The last gradients (generator and critic) in the peer's names and shapes.
    pub fn gradients<O: TrainOps>(&self, ops: &mut O) -> Result<StateDict, O::Error> {
        self.tables(ops, [GEN[1], CRITIC[1], usize::MAX])
    }

    fn tables<O: TrainOps>(&self, ops: &mut O, bufs: [usize; 3]) -> Result<StateDict, O::Error> {
        let mut sd = StateDict::new("the training engine");
        for (table, buf) in [&self.gen, &self.critic, &self.consts]
            .into_iter()
            .zip(bufs)
        {
            if buf == usize::MAX {
                continue;
            }
            table.read_into(ops, buf, &mut sd)?;
        }
        Ok(sd)
    }
}

/// [`PretrainStep`] on the host ops: the CPU twin of the GPU's step.
pub fn host_step(
    cfg: &MarlinConfig,
    sd: &StateDict,
    shape: StepShape,
    losses: LossConfig,
) -> Result<(PretrainStep, HostTrainOps), TrainEngineError> {
    let step = PretrainStep::new(cfg, sd, shape, losses)?;
    let mut ops = HostTrainOps::default();
    match step.load(&mut ops) {
        Ok(()) => Ok((step, ops)),
        Err(e) => match e {},
    }
}
