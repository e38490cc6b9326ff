//! The encoder's forward as data: one fixed list of steps over named buffers, built by a pure
//! function of the model's shape, the batch size and the output kind, and run by any [`Ops`]
//! (the host twin in every test; CUDA on a GPU, captured as one graph per batch size).
//!
//! ```text
//! Clips [B, 3, T, H, W] ──patchify──► Tokens [B·N, P]
//! Tokens · Wpe + b ─────────────────► X [B·N, D]            (f32: the residual stream)
//! per block i:
//!   X += pos (block 0 only); H = LN1(X)                     (one step)
//!   Qkv = H · Wqkv + (q_bias, 0, v_bias)      [B·N, 3D]
//!   Att = softmax(q·kᵀ·scale)·v per head       [B·N, D]     (q, k, v read in place from Qkv)
//!   X += Att · Wproj + b                      (γ₁ folded into Wproj, b)
//!   H = LN2(X)
//!   Hidden = GELU(H · Wfc1 + b)               [B·N, Hid]
//!   X += Hidden · Wfc2 + b                    (γ₂ folded into Wfc2, b)
//! keep_seq: Out = LN(X) [B·N, D]; pooled: Out = LN(mean over tokens of X) [B, D]
//! ```
//!
//! Every product is `D (+)= A · W + bias` over row-major activations with the weight as a
//! Linear's `[out, in]`: a GEMM with a bias epilogue and, for the residual adds, the output
//! as its own accumulator (cuBLASLt's `D = A·B + bias + C` with C = D).

use super::weights::EncoderWeights;
use crate::kernels::Precision;

/// An activation buffer of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Act {
    /// The clips `[B, 3, T, H, W]`, f32 (the engine's input).
    Clips,
    /// Tubelets `[B·N, P]`, P = 3·tubelet·patch².
    Tokens,
    /// The residual stream `[B·N, D]`, f32 in every precision.
    X,
    /// A LayerNorm's output `[B·N, D]`, the next product's input.
    H,
    /// The fused projection `[B·N, 3D]` (q, k, v of every head).
    Qkv,
    /// Attention's output `[B·N, D]` (heads side by side).
    Att,
    /// The MLP's hidden layer `[B·N, Hid]`.
    Hidden,
    /// The features: `[B·N, D]` (keep_seq) or `[B, D]` (pooled), f32 (the engine's output).
    Out,
}

impl Act {
    pub const ALL: [Act; 8] = [
        Act::Clips,
        Act::Tokens,
        Act::X,
        Act::H,
        Act::Qkv,
        Act::Att,
        Act::Hidden,
        Act::Out,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Act::Clips => "clips",
            Act::Tokens => "tokens",
            Act::X => "x",
            Act::H => "h",
            Act::Qkv => "qkv",
            Act::Att => "att",
            Act::Hidden => "hidden",
            Act::Out => "out",
        }
    }
}

/// How a buffer's values are stored on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    #[default]
    F32,
    Bf16,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// The storage of `act` in `precision`: the residual stream, the clips and the features stay
/// f32; a product's operands and the outputs that only feed products are the compute type
/// (bf16 in bf16, as PyTorch's autocast keeps them; f32 otherwise).
pub fn act_dtype(act: Act, precision: Precision) -> DType {
    match (act, precision) {
        (Act::Clips | Act::X | Act::Out, _) => DType::F32,
        (_, Precision::Bf16) => DType::Bf16,
        _ => DType::F32,
    }
}

/// The compute type of products (and of the weights they read) in `precision`.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Bf16 => DType::Bf16,
        Precision::F32 | Precision::Tf32 => DType::F32,
    }
}

/// A Linear of the encoder: its weight `[out, in]` and bias `[out]` (if any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Linear {
    /// The tubelet embedding `[D, P]`.
    Patch,
    /// Block i's qkv projection `[3D, D]`; its bias (q_bias, 0, v_bias) where the model has one.
    Qkv(usize),
    Proj(usize),
    Fc1(usize),
    Fc2(usize),
}

/// A LayerNorm of the encoder (weight and bias `[D]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Norm {
    Norm1(usize),
    Norm2(usize),
    /// The final LayerNorm.
    Final,
}

/// `d (+)= a · wᵀ + bias`, all row-major: a `[m, k]`, w `[n, k]` (a Linear's `[out, in]`),
/// d `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub a: Act,
    pub w: Linear,
    pub d: Act,
    /// Add onto d (the residual stream) instead of overwriting it.
    pub accumulate: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Whether the Linear has a bias (added in the epilogue).
    pub bias: bool,
}

/// One step of the forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Tokens = tubelets of Clips.
    Patchify {
        /// `[B, C, T, H, W]`.
        clip: [usize; 5],
        tubelet: usize,
        patch: usize,
    },
    Gemm(Gemm),
    /// `out = LN(X)` row by row (`rows` rows of `d`); with `add_position`, X += the position
    /// table (row r gets table row r mod `tokens`) first, written back.
    LayerNorm {
        norm: Norm,
        out: Act,
        rows: usize,
        d: usize,
        add_position: bool,
        tokens: usize,
    },
    /// Att = attention of Qkv, per clip and head.
    Attention {
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    },
    /// Exact (erf) GELU of Hidden in place (`len` values).
    Gelu {
        len: usize,
    },
    /// Out `[B, D]` = LN(mean over each clip's tokens of X).
    MeanLayerNorm {
        batch: usize,
        tokens: usize,
        d: usize,
    },
}

/// The whole forward for one batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub batch: usize,
    pub keep_seq: bool,
    pub steps: Vec<Step>,
    /// Values of each buffer (in [`Act::ALL`] order).
    pub sizes: [usize; 8],
    /// Tokens per clip and width: the output is `[batch, tokens or 1, dim]`.
    pub tokens: usize,
    pub dim: usize,
}

impl Plan {
    /// Values of `act`.
    pub fn len(&self, act: Act) -> usize {
        self.sizes[Act::ALL.iter().position(|&a| a == act).unwrap_or(0)]
    }

    /// The output's shape `[B, N or 1, D]`.
    pub fn out_shape(&self) -> [usize; 3] {
        let n = if self.keep_seq { self.tokens } else { 1 };
        [self.batch, n, self.dim]
    }

    /// The GEMMs of the plan, in order.
    pub fn gemms(&self) -> impl Iterator<Item = &Gemm> {
        self.steps.iter().filter_map(|s| match s {
            Step::Gemm(g) => Some(g),
            _ => None,
        })
    }

    /// Floating-point operations of one run (products and attention: 2 per multiply-add).
    pub fn flops(&self) -> f64 {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Gemm(g) => 2.0 * (g.m * g.n * g.k) as f64,
                Step::Attention {
                    batch,
                    tokens,
                    heads,
                    head_dim,
                    ..
                } => 4.0 * (batch * heads * tokens * tokens * head_dim) as f64,
                _ => 0.0,
            })
            .sum()
    }
}

/// The shape of an encoder, as the schedule needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub frames: usize,
    pub img: usize,
    pub tubelet: usize,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub hidden: usize,
    pub scale: f32,
    pub qkv_bias: bool,
}

impl Shape {
    /// Tokens per clip.
    pub fn tokens(&self) -> usize {
        (self.frames / self.tubelet) * (self.img / self.patch).pow(2)
    }

    /// Values per tubelet.
    pub fn patch_dim(&self) -> usize {
        3 * self.tubelet * self.patch * self.patch
    }

    pub fn of(w: &EncoderWeights) -> Self {
        w.shape
    }
}

/// The encoder's forward for `batch` clips: features per token (`keep_seq`) or pooled.
pub fn plan(s: &Shape, batch: usize, keep_seq: bool) -> Plan {
    let n = s.tokens();
    let rows = batch * n;
    let (d, hid, p) = (s.dim, s.hidden, s.patch_dim());
    let mut steps = vec![
        Step::Patchify {
            clip: [batch, 3, s.frames, s.img, s.img],
            tubelet: s.tubelet,
            patch: s.patch,
        },
        Step::Gemm(Gemm {
            a: Act::Tokens,
            w: Linear::Patch,
            d: Act::X,
            accumulate: false,
            m: rows,
            n: d,
            k: p,
            bias: true,
        }),
    ];
    let gemm = |a, w, d_act, accumulate, n_out, k, bias| {
        Step::Gemm(Gemm {
            a,
            w,
            d: d_act,
            accumulate,
            m: rows,
            n: n_out,
            k,
            bias,
        })
    };
    let ln = |norm, add_position| Step::LayerNorm {
        norm,
        out: Act::H,
        rows,
        d,
        add_position,
        tokens: n,
    };
    for i in 0..s.depth {
        steps.extend([
            ln(Norm::Norm1(i), i == 0),
            gemm(
                Act::H,
                Linear::Qkv(i),
                Act::Qkv,
                false,
                3 * d,
                d,
                s.qkv_bias,
            ),
            Step::Attention {
                batch,
                tokens: n,
                heads: s.heads,
                head_dim: d / s.heads,
                scale: s.scale,
            },
            gemm(Act::Att, Linear::Proj(i), Act::X, true, d, d, true),
            ln(Norm::Norm2(i), false),
            gemm(Act::H, Linear::Fc1(i), Act::Hidden, false, hid, d, true),
            Step::Gelu { len: rows * hid },
            gemm(Act::Hidden, Linear::Fc2(i), Act::X, true, d, hid, true),
        ]);
    }
    if s.depth == 0 {
        // No block adds the positions: a step of its own (LN into H, unused).
        steps.push(ln(Norm::Final, true));
    }
    steps.push(if keep_seq {
        Step::LayerNorm {
            norm: Norm::Final,
            out: Act::Out,
            rows,
            d,
            add_position: false,
            tokens: n,
        }
    } else {
        Step::MeanLayerNorm {
            batch,
            tokens: n,
            d,
        }
    });
    let clip = batch * 3 * s.frames * s.img * s.img;
    let out = if keep_seq { rows * d } else { batch * d };
    Plan {
        batch,
        keep_seq,
        steps,
        sizes: [
            clip,
            rows * p,
            rows * d,
            rows * d,
            rows * 3 * d,
            rows * d,
            rows * hid,
            out,
        ],
        tokens: n,
        dim: d,
    }
}

/// Device memory of the activations of `plan` in `precision` (bytes).
pub fn activation_bytes(plan: &Plan, precision: Precision) -> usize {
    Act::ALL
        .iter()
        .map(|&a| plan.len(a) * act_dtype(a, precision).bytes())
        .sum()
}

/// What runs the schedule's steps. Buffers and weights are the implementation's own; the
/// schedule names them ([`Act`], [`Linear`], [`Norm`]). Steps run in order; an implementation
/// may queue them (a GPU stream) as long as each sees the results of those before it.
pub trait Ops {
    type Error;
    fn patchify(
        &mut self,
        clip: [usize; 5],
        tubelet: usize,
        patch: usize,
    ) -> Result<(), Self::Error>;
    fn gemm(&mut self, g: &Gemm) -> Result<(), Self::Error>;
    fn layer_norm(
        &mut self,
        norm: Norm,
        out: Act,
        rows: usize,
        d: usize,
        position: Option<usize>,
    ) -> Result<(), Self::Error>;
    fn attention(
        &mut self,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<(), Self::Error>;
    fn gelu(&mut self, len: usize) -> Result<(), Self::Error>;
    fn mean_layer_norm(&mut self, batch: usize, tokens: usize, d: usize)
        -> Result<(), Self::Error>;
}

/// Run every step of `plan` on `ops`, in order.
pub fn run<O: Ops>(plan: &Plan, ops: &mut O) -> Result<(), O::Error> {
    for step in &plan.steps {
        match *step {
            Step::Patchify {
                clip,
                tubelet,
                patch,
            } => ops.patchify(clip, tubelet, patch)?,
            Step::Gemm(ref g) => ops.gemm(g)?,
            Step::LayerNorm {
                norm,
                out,
                rows,
                d,
                add_position,
                tokens,
            } => ops.layer_norm(norm, out, rows, d, add_position.then_some(tokens))?,
            Step::Attention {
                batch,
                tokens,
                heads,
                head_dim,
                scale,
            } => ops.attention(batch, tokens, heads, head_dim, scale)?,
            Step::Gelu { len } => ops.gelu(len)?,
            Step::MeanLayerNorm { batch, tokens, d } => ops.mean_layer_norm(batch, tokens, d)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vit_b() -> Shape {
        Shape {
            frames: 16,
            img: 224,
            tubelet: 2,
            patch: 16,
            dim: 768,
            depth: 12,
            heads: 12,
            hidden: 3072,
            scale: 0.125,
            qkv_bias: true,
        }
    }

    #[test]
    fn vit_b_plan_has_the_papers_shapes() {
        let p = plan(&vit_b(), 64, false);
        assert_eq!(p.tokens, 1568);
        // patchify, embedding, 8 steps per block, pooled LN.
        assert_eq!(p.steps.len(), 2 + 12 * 8 + 1);
        let g: Vec<&Gemm> = p.gemms().collect();
        assert_eq!(g.len(), 1 + 12 * 4);
        let rows = 64 * 1568;
        assert_eq!((g[0].m, g[0].n, g[0].k), (rows, 768, 1536));
        assert_eq!(
            (g[1].m, g[1].n, g[1].k, g[1].d),
            (rows, 2304, 768, Act::Qkv)
        );
        assert!(!g[1].accumulate && g[1].bias);
        assert_eq!(
            (g[2].n, g[2].k, g[2].d, g[2].accumulate),
            (768, 768, Act::X, true)
        );
        assert_eq!((g[3].n, g[3].k, g[3].d), (3072, 768, Act::Hidden));
        assert_eq!((g[4].n, g[4].k, g[4].accumulate), (768, 3072, true));
        // Only the first block's LN1 adds the positions.
        let with_pos = p
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Step::LayerNorm {
                        add_position: true,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(with_pos, 1);
        assert!(matches!(
            p.steps[2],
            Step::LayerNorm {
                add_position: true,
                norm: Norm::Norm1(0),
                ..
            }
        ));
        assert!(matches!(
            p.steps.last(),
            Some(Step::MeanLayerNorm {
                batch: 64,
                tokens: 1568,
                d: 768
            })
        ));
        assert_eq!(p.out_shape(), [64, 1, 768]);
        assert_eq!(p.len(Act::Out), 64 * 768);
        assert_eq!(p.len(Act::Clips), 64 * 3 * 16 * 224 * 224);
        // 357 GFLOP per clip in the blocks (what `marlin bench` counts), 3.7 in the embedding.
        let embed = 2.0 * 64.0 * 1568.0 * 768.0 * 1536.0;
        let blocks = crate::kernels::peak::encoder_flops(64, 1568, 768, 3072, 12);
        assert_eq!(p.flops(), blocks + embed);
        assert!((blocks / 64.0 / 1e9 - 357.0).abs() < 1.0);
    }

    #[test]
    fn keep_seq_ends_with_a_layer_norm_of_every_token() {
        let p = plan(&vit_b(), 2, true);
        assert!(matches!(
            p.steps.last(),
            Some(Step::LayerNorm {
                norm: Norm::Final,
                out: Act::Out,
                rows: 3136,
                ..
            })
        ));
        assert_eq!(p.out_shape(), [2, 1568, 768]);
        assert_eq!(p.len(Act::Out), 2 * 1568 * 768);
    }

    #[test]
    fn bf16_keeps_the_residual_stream_and_the_ends_in_f32() {
        for a in Act::ALL {
            let want = match a {
                Act::Clips | Act::X | Act::Out => DType::F32,
                _ => DType::Bf16,
            };
            assert_eq!(act_dtype(a, Precision::Bf16), want, "{}", a.name());
            assert_eq!(act_dtype(a, Precision::Tf32), DType::F32);
        }
        // ViT-B at batch 64 in bf16: about 2.3 GB of activations besides the clips.
        let p = plan(&vit_b(), 64, false);
        let bytes = activation_bytes(&p, Precision::Bf16) - p.len(Act::Clips) * 4;
        assert!((2.0e9..2.6e9).contains(&(bytes as f64)), "{bytes}");
    }

    #[test]
    fn a_model_without_qkv_bias_has_no_bias_in_that_product() {
        let mut s = vit_b();
        s.qkv_bias = false;
        let p = plan(&s, 1, false);
        assert!(p
            .gemms()
            .filter(|g| matches!(g.w, Linear::Qkv(_)))
            .all(|g| !g.bias));
        assert!(p
            .gemms()
            .filter(|g| !matches!(g.w, Linear::Qkv(_)))
            .all(|g| g.bias));
    }
}
