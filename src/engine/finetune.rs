//! The fine-tuning step (the reference's downstream `Classifier` with its encoder: a linear
//! head on the encoder's pooled features, Adam) written once over the training engine's ops
//! ([`TrainOps`]), so the host ops and the CUDA ops run the same schedule as the pretraining
//! step ([`super::train`]).
//!
//! ```text
//! Clips ─patchify─► Tokens [B·N, P] ─·Wpeᵀ + b + pos─► X [B·N, D]
//! encoder blocks (tape kept) ─► H [B·N, D]
//! pooled = Pool · H   [B, D]    (Pool [B, B·N]: 1/N on each clip's rows, the mean of dim 1)
//! F = LN(pooled) ─·Wfcᵀ + b─► logits [B, K]
//! loss: binary cross-entropy with logits (mean over B·K) or cross-entropy (mean over B),
//!       with its gradient, on the host (K values per clip)
//! ```
//!
//! The backward runs the same way down: the head, the LayerNorm, `Poolᵀ · dpooled` (every
//! token of a clip gets 1/N of its pooled gradient), the blocks, the tubelet embedding. The
//! parameters (the encoder's and the head's, in their official names) live in one flat buffer
//! with their gradients and Adam's moments; the positional table is a constant.

use super::train::{
    encoder_keys, linear, linear_backward, refresh_copy, shape_check, weight_grad, Activations,
    DType, Gemm, GradSync, Layout, NoSync, ParamTable, Pieces, Stack, TrainEngineError, TrainOps,
    T,
};
use crate::kernels::cpu_train::AdamW;
use crate::model::host::StateDict;
use crate::MarlinConfig;

/// The head's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLoss {
    /// Softmax cross-entropy against a class index per clip (mean over the clips).
    CrossEntropy,
    /// Binary cross-entropy with logits against a 0/1 target per logit (mean over all).
    BinaryCrossEntropy,
}

impl HeadLoss {
    /// The mean loss of `logits` `[b, k]` against `targets` (a class index per clip, or `b·k`
    /// values) and its gradient with respect to the logits. NaN where the logits are.
    pub fn loss_and_grad(self, logits: &[f32], targets: &[f32], k: usize) -> (f64, Vec<f32>) {
        let b = logits.len() / k.max(1);
        let mut grad = vec![0f32; logits.len()];
        let mut total = 0f64;
        match self {
            HeadLoss::CrossEntropy => {
                for (i, (row, g)) in logits.chunks(k).zip(grad.chunks_mut(k)).enumerate() {
                    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
                    let lse = max + sum.ln();
                    let class = targets[i] as usize;
                    total += lse - row[class] as f64;
                    for (j, (&x, g)) in row.iter().zip(g.iter_mut()).enumerate() {
                        let p = (x as f64 - lse).exp();
                        let y = f64::from(u8::from(j == class));
                        *g = ((p - y) / b as f64) as f32;
                    }
                }
                (total / b as f64, grad)
            }
            HeadLoss::BinaryCrossEntropy => {
                let n = logits.len() as f64;
                for ((&x, &y), g) in logits.iter().zip(targets).zip(grad.iter_mut()) {
                    let (x, y) = (x as f64, y as f64);
                    // max(x, 0) - x y + log(1 + exp(-|x|)), and its derivative σ(x) - y.
                    total += x.max(0.0) - x * y + (-x.abs()).exp().ln_1p();
                    *g = ((1.0 / (1.0 + (-x).exp()) - y) / n) as f32;
                }
                (total / n, grad)
            }
        }
    }
}

/// Buffer numbers: parameters, gradients, Adam's first and second moments, constants.
const PARAMS: [usize; 4] = [0, 1, 2, 3];
const CONST: usize = 4;

/// Adam's settings of the reference's fine-tuning (`torch.optim.Adam`, betas (0.5, 0.9),
/// eps 1e-8, no weight decay).
pub const ADAM_BETAS: (f32, f32) = (0.5, 0.9);
pub const ADAM_EPS: f32 = 1e-8;

/// Adam's state: the moments in the parameters' names and shapes and the updates made.
#[derive(Debug, Clone)]
pub struct AdamState {
    pub exp_avg: StateDict,
    pub exp_avg_sq: StateDict,
    pub updates: u32,
}

/// The fine-tuning step on [`TrainOps`] for batches of `batch` clips.
#[derive(Debug, Clone)]
pub struct FinetuneStep {
    pub batch: usize,
    pub classes: usize,
    pub layout: Layout,
    loss_kind: HeadLoss,
    ln_eps: f32,
    clip: [usize; 5],
    tubelet: usize,
    patch: usize,
    tokens: usize,
    patch_dim: usize,
    params: ParamTable,
    consts: ParamTable,
    param_values: Vec<f32>,
    const_values: Vec<f32>,
    enc: Stack,
    clips: T,
    tokens_all: T,
    /// `[B, B·N]`, 1/N on each clip's own rows.
    pool: T,
    pooled: T,
    f: T,
    f_st: T,
    logits: T,
    dlogits: T,
    df: T,
    dpooled: T,
    updates: u32,
    /// The encoder's weights as its blocks' product operands: `PARAMS[0]` in f32, a bf16 copy
    /// (refreshed after each update) in bf16.
    wbuf: usize,
}

/// The parameters' keys in buffer order: the encoder's, then the head's.
fn param_keys(cfg: &MarlinConfig) -> Vec<String> {
    let mut keys = encoder_keys(cfg);
    keys.extend(["fc.weight".into(), "fc.bias".into()]);
    keys
}

impl FinetuneStep {
    /// Whether the engine covers `cfg`'s encoder: layer scale stays on burn's path.
    pub fn supports(cfg: &MarlinConfig) -> Result<(), TrainEngineError> {
        if cfg.init_values > 0.0 {
            return Err(TrainEngineError::Unsupported(
                "layer scale (init_values > 0)",
            ));
        }
        Ok(())
    }

    /// The step for `cfg`'s encoder and a head of `classes` logits with the weights of `sd`
    /// (the encoder's official names, `fc.weight` `[K, D]`, `fc.bias`), batches of `batch`.
    pub fn new(
        cfg: &MarlinConfig,
        sd: &StateDict,
        batch: usize,
        loss_kind: HeadLoss,
    ) -> Result<Self, TrainEngineError> {
        Self::new_in(cfg, sd, batch, loss_kind, DType::F32)
    }

    /// [`Self::new`] with the encoder blocks' activations kept as `act` says (as in
    /// [`super::train::PretrainStep::new_in`]: in bf16 the blocks' products on bf16 operands,
    /// everything else f32; the LayerNorm and GELU outputs kept or recomputed).
    pub fn new_in(
        cfg: &MarlinConfig,
        sd: &StateDict,
        batch: usize,
        loss_kind: HeadLoss,
        act: impl Into<Activations>,
    ) -> Result<Self, TrainEngineError> {
        let acts = act.into();
        let act = acts.dtype;
        Self::supports(cfg)?;
        let d = cfg.encoder.embed_dim;
        let (n, p) = (cfg.num_patches(), cfg.patch_dim());
        let fc = sd
            .tensors
            .get("fc.weight")
            .ok_or_else(|| TrainEngineError::Missing("fc.weight".into()))?;
        let classes = fc.data.len() / d.max(1);
        shape_check(sd, "fc.weight", &[classes, d])?;
        shape_check(sd, "fc.bias", &[classes])?;
        shape_check(sd, "encoder.patch_embedding.projection.weight", &[d, p])?;
        shape_check(sd, "encoder.pos_embedding.emb", &[n, d])?;
        let (params, param_values) = ParamTable::build(sd, &param_keys(cfg), PARAMS[0])?;
        let (consts, const_values) =
            ParamTable::build(sd, &["encoder.pos_embedding.emb".to_string()], CONST)?;
        let mut layout = Layout::default();
        for (name, len) in [
            ("params", params.len),
            ("params.grad", params.len),
            ("params.m", params.len),
            ("params.v", params.len),
            ("const", consts.len),
        ] {
            layout.float(name, len);
        }
        let wbuf = match act {
            DType::F32 => PARAMS[0],
            DType::Bf16 => layout.float_in("params.act", params.len, act).buf,
        };
        let scale = crate::model::block::attention_scale(cfg.qk_scale, d, cfg.encoder.num_heads);
        let enc = Stack::new(
            &mut layout,
            "encoder",
            &params,
            &cfg.encoder,
            cfg.mlp_hidden(d),
            scale as f32,
            cfg.qkv_bias,
            [batch, n],
            acts,
            wbuf,
        )?;
        let rows = batch * n;
        let clip = [batch, 3, cfg.clip_frames, cfg.img_size, cfg.img_size];
        let mut f = |name: &str, len: usize| layout.float(name, len);
        Ok(Self {
            batch,
            classes,
            loss_kind,
            ln_eps: crate::model::load::LN_EPS as f32,
            clip,
            tubelet: cfg.tubelet_size,
            patch: cfg.patch_size,
            tokens: n,
            patch_dim: p,
            enc,
            clips: f("clips", clip.iter().product()),
            tokens_all: f("tokens", rows * p),
            pool: f("pool", batch * rows),
            pooled: f("pooled", batch * d),
            f: f("f", batch * d),
            f_st: f("f_st", batch * 2),
            logits: f("logits", batch * classes),
            dlogits: f("dlogits", batch * classes),
            df: f("df", batch * d),
            dpooled: f("dpooled", batch * d),
            params,
            consts,
            param_values,
            const_values,
            layout,
            updates: 0,
            wbuf,
        })
    }

    fn refresh_weights<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        refresh_copy(ops, self.params.all(), self.wbuf)
    }

    /// Allocate `ops`' buffers, upload the weights and the pooling matrix, zero Adam's state.
    pub fn load<O: TrainOps>(&self, ops: &mut O) -> Result<(), O::Error> {
        ops.set_batch(self.batch);
        ops.prepare(&self.layout)?;
        ops.upload(self.params.all(), &self.param_values)?;
        ops.upload(self.consts.all(), &self.const_values)?;
        self.refresh_weights(ops)?;
        for b in [PARAMS[2], PARAMS[3]] {
            ops.fill(self.params.all().of(b), 0.0)?;
        }
        let (b, n) = (self.batch, self.tokens);
        let mut pool = vec![0f32; b * b * n];
        for (i, row) in pool.chunks_mut(b * n).enumerate() {
            row[i * n..(i + 1) * n].fill(1.0 / n as f32);
        }
        ops.upload(self.pool, &pool)
    }

    fn p(&self, key: &str) -> T {
        // Every key asked for here was checked when the step was built.
        self.params
            .get(key)
            .or_else(|_| self.consts.get(key))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Upload a batch of clips `[B, 3, T, H, W]` (flat).
    pub fn upload_clips<O: TrainOps>(
        &self,
        ops: &mut O,
        clips: &[f32],
    ) -> Result<(), TrainEngineError> {
        if clips.len() != self.clips.len {
            return Err(TrainEngineError::BatchSize {
                got: clips.len() / (self.clips.len / self.batch.max(1)).max(1),
                want: self.batch,
            });
        }
        ops.upload(self.clips, clips)
            .map_err(|e| TrainEngineError::Device(e.to_string()))
    }

    /// The forward from the uploaded clips to the logits `[B, K]`, keeping what the backward
    /// needs.
    pub fn forward<O: TrainOps>(&self, ops: &mut O) -> Result<Vec<f32>, O::Error> {
        let (b, n, p, d) = (self.batch, self.tokens, self.patch_dim, self.enc.dim);
        let rows = b * n;
        ops.patchify(
            self.clips,
            self.clip,
            self.tubelet,
            self.patch,
            self.tokens_all,
        )?;
        let x = self.enc.input();
        ops.gemm(&linear(
            x,
            self.tokens_all,
            self.p("encoder.patch_embedding.projection.weight"),
            Some(self.p("encoder.patch_embedding.projection.bias")),
            rows,
            d,
            p,
            false,
        ))?;
        ops.gather(&super::train::Gather {
            src: super::train::Rows {
                t: self.p("encoder.pos_embedding.emb"),
                per_batch: 0,
                start: 0,
            },
            idx: None,
            dst: super::train::Rows {
                t: x,
                per_batch: n,
                start: 0,
            },
            batch: b,
            count: n,
            width: d,
            accumulate: true,
        })?;
        self.enc.forward(ops, b, self.ln_eps)?;
        ops.gemm(&Gemm {
            d: self.pooled,
            a: self.pool,
            ta: false,
            b: self.enc.out,
            tb: false,
            m: b,
            n: d,
            k: rows,
            bias: None,
            accumulate: false,
        })?;
        ops.layer_norm(
            self.pooled,
            self.p("encoder.norm.weight"),
            self.p("encoder.norm.bias"),
            self.ln_eps,
            d,
            self.f,
            self.f_st,
        )?;
        ops.gemm(&linear(
            self.logits,
            self.f,
            self.p("fc.weight"),
            Some(self.p("fc.bias")),
            b,
            self.classes,
            d,
            false,
        ))?;
        ops.read(self.logits)
    }

    /// The gradients (`params.grad`, zeroed first) from `dlogits` `[B, K]` after
    /// [`Self::forward`].
    pub fn backward<O: TrainOps>(&self, ops: &mut O, dlogits: &[f32]) -> Result<(), O::Error> {
        let mut one = NoSync;
        let mut pieces = Pieces::new(&mut one, self.params.all().of(PARAMS[1]));
        self.backward_into(ops, dlogits, &mut pieces)
    }

    /// [`Self::backward`], each layer's gradients handed to `pieces` once final.
    fn backward_into<O: TrainOps>(
        &self,
        ops: &mut O,
        dlogits: &[f32],
        pieces: &mut Pieces<'_, O>,
    ) -> Result<(), O::Error> {
        let (b, n, p, d) = (self.batch, self.tokens, self.patch_dim, self.enc.dim);
        let rows = b * n;
        let g = PARAMS[1];
        ops.fill(self.params.all().of(g), 0.0)?;
        ops.upload(self.dlogits, dlogits)?;
        let fc = (self.p("fc.weight"), self.p("fc.bias"));
        linear_backward(
            ops,
            self.dlogits,
            self.f,
            fc,
            self.df,
            b,
            self.classes,
            d,
            g,
        )?;
        pieces.final_from(ops, fc.0.of(g))?;
        ops.fill(self.dpooled, 0.0)?;
        let (nw, nb) = (self.p("encoder.norm.weight"), self.p("encoder.norm.bias"));
        ops.layer_norm_backward(
            self.pooled,
            self.f_st,
            nw,
            self.df,
            d,
            self.dpooled,
            nw.of(g),
            nb.of(g),
        )?;
        pieces.final_from(ops, nw.of(g))?;
        // Each token of a clip gets 1/N of its pooled gradient.
        ops.gemm(&Gemm {
            d: self.enc.dx,
            a: self.pool,
            ta: true,
            b: self.dpooled,
            tb: false,
            m: rows,
            n: d,
            k: b,
            bias: None,
            accumulate: false,
        })?;
        self.enc.backward(ops, b, self.ln_eps, g, pieces)?;
        // The tubelet embedding (the positions are constants).
        let w = self.p("encoder.patch_embedding.projection.weight");
        let bias = self.p("encoder.patch_embedding.projection.bias");
        ops.gemm(&weight_grad(
            w.of(g),
            self.enc.dx,
            self.tokens_all,
            [d, p, rows],
        ))?;
        ops.col_sum(self.enc.dx, d, 0, bias.of(g))
    }

    /// One step on the uploaded clips with `targets` (a class index per clip, or `B·K` 0/1
    /// values) at learning rate `lr`: forward, loss, backward (the gradients handed to
    /// `sync` as it finishes them: a data-parallel run's average, with the loss's), Adam. A
    /// non-finite loss skips the update (`None`); otherwise the loss.
    pub fn step_with<O: TrainOps>(
        &mut self,
        ops: &mut O,
        targets: &[f32],
        lr: f64,
        sync: &mut dyn GradSync<O>,
    ) -> Result<Option<f64>, O::Error> {
        let logits = self.forward(ops)?;
        let (loss, dlogits) = self.loss_kind.loss_and_grad(&logits, targets, self.classes);
        let all = self.params.all();
        let mut pieces = Pieces::new(sync, all.of(PARAMS[1]));
        self.backward_into(ops, &dlogits, &mut pieces)?;
        let mut v = [loss as f32];
        pieces.finish(ops, &mut v)?;
        let loss = if v[0].is_finite() {
            v[0] as f64
        } else {
            return Ok(None);
        };
        self.updates += 1;
        let h = AdamW {
            lr: lr as f32,
            beta1: ADAM_BETAS.0,
            beta2: ADAM_BETAS.1,
            eps: ADAM_EPS,
            weight_decay: 0.0,
            step: self.updates,
        };
        ops.adamw(
            all,
            all.of(PARAMS[1]),
            all.of(PARAMS[2]),
            all.of(PARAMS[3]),
            &h,
        )?;
        self.refresh_weights(ops)?;
        Ok(Some(loss))
    }

    /// [`Self::step_with`] on one process.
    pub fn step<O: TrainOps>(
        &mut self,
        ops: &mut O,
        targets: &[f32],
        lr: f64,
    ) -> Result<Option<f64>, O::Error> {
        self.step_with(ops, targets, lr, &mut NoSync)
    }

    /// The current weights (the encoder's official names with its positional table, and the
    /// head's).
    pub fn state_dict<O: TrainOps>(&self, ops: &mut O) -> Result<StateDict, O::Error> {
        let mut sd = self.table(ops, &self.params, PARAMS[0])?;
        self.consts.read_into(ops, CONST, &mut sd)?;
        Ok(sd)
    }

    /// The last step's gradients (reduced, in a data-parallel run) by parameter name.
    pub fn gradients<O: TrainOps>(&self, ops: &mut O) -> Result<StateDict, O::Error> {
        self.table(ops, &self.params, PARAMS[1])
    }

    /// Adam's moments and the updates made.
    pub fn optimizer_state<O: TrainOps>(&self, ops: &mut O) -> Result<AdamState, O::Error> {
        Ok(AdamState {
            exp_avg: self.table(ops, &self.params, PARAMS[2])?,
            exp_avg_sq: self.table(ops, &self.params, PARAMS[3])?,
            updates: self.updates,
        })
    }

    fn table<O: TrainOps>(
        &self,
        ops: &mut O,
        table: &ParamTable,
        buf: usize,
    ) -> Result<StateDict, O::Error> {
        let mut sd = StateDict::new("the training engine");
        table.read_into(ops, buf, &mut sd)?;
        Ok(sd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host losses' gradients against central differences.
    #[test]
    fn head_losses_match_finite_differences() {
        let logits = [0.3f32, -1.2, 2.0, 0.1, -0.4, 0.7];
        for (kind, targets) in [
            (HeadLoss::CrossEntropy, vec![2.0f32, 0.0]),
            (
                HeadLoss::BinaryCrossEntropy,
                vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
            ),
        ] {
            let (_, grad) = kind.loss_and_grad(&logits, &targets, 3);
            for i in 0..logits.len() {
                let h = 1e-3f32;
                let (mut up, mut down) = (logits, logits);
                up[i] += h;
                down[i] -= h;
                let num = (kind.loss_and_grad(&up, &targets, 3).0
                    - kind.loss_and_grad(&down, &targets, 3).0)
                    / (2.0 * h as f64);
                assert!(
                    (num - grad[i] as f64).abs() < 1e-4,
                    "{kind:?} logit {i}: numeric {num}, analytic {}",
                    grad[i]
                );
            }
        }
        // The values themselves: -log softmax of the target class, mean over the clips.
        let (ce, _) = HeadLoss::CrossEntropy.loss_and_grad(&[0.0, 0.0], &[1.0], 2);
        assert!((ce - 2f64.ln()).abs() < 1e-12, "{ce}");
        let (bce, _) = HeadLoss::BinaryCrossEntropy.loss_and_grad(&[f32::NAN], &[1.0], 1);
        assert!(bce.is_nan());
    }
}
