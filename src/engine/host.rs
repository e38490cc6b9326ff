//! The schedule on the host: each step one of the CPU backend's kernels (the products through
//! `gemm` in f32 or the bf16 panels in bf16, attention from packed panels, the vectorised
//! LayerNorm and GELU). It is the CPU's extraction, and the twin of the CUDA engine: the same
//! steps, shapes and buffers, checked against the peer's fixtures in every test run.

use super::schedule::{self, Act, Gemm, Linear, Norm, Ops, Plan};
use super::{EncoderWeights, FeatureEngine, Pending};
use crate::device_error::DeviceError;
use crate::kernels::{bf16, cpu, Precision};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// The host's buffers and weights for the schedule.
pub struct HostOps {
    w: std::sync::Arc<EncoderWeights>,
    precision: Precision,
    /// bf16: each Linear's weight packed once for the bf16 products.
    panels: HashMap<Linear, Vec<u32>>,
    bufs: [Vec<f32>; 8],
}

fn index(a: Act) -> usize {
    Act::ALL.iter().position(|&x| x == a).unwrap_or(0)
}

impl HostOps {
    /// `precision` as the CPU computes it ([`crate::kernels::cpu_effective_precision`]): f32
    /// or bf16.
    pub fn new(w: std::sync::Arc<EncoderWeights>, precision: Precision) -> Self {
        let precision = match precision {
            Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        };
        let panels = if precision == Precision::Bf16 {
            w.linears()
                .into_iter()
                .map(|l| {
                    let lw = w.linear(l);
                    (l, bf16::panels(&lw.w, lw.inp, lw.out))
                })
                .collect()
        } else {
            HashMap::new()
        };
        Self {
            w,
            precision,
            panels,
            bufs: Default::default(),
        }
    }

    /// Size every buffer for `plan` (values are overwritten before they are read).
    pub fn prepare(&mut self, plan: &Plan) {
        for a in Act::ALL {
            self.bufs[index(a)].resize(plan.len(a), 0.0);
        }
    }

    pub fn buf(&self, a: Act) -> &[f32] {
        &self.bufs[index(a)]
    }

    pub fn buf_mut(&mut self, a: Act) -> &mut Vec<f32> {
        &mut self.bufs[index(a)]
    }

    /// Buffer `a` taken out (to borrow it beside another), put back by [`HostOps::put`].
    fn take(&mut self, a: Act) -> Vec<f32> {
        std::mem::take(&mut self.bufs[index(a)])
    }

    fn put(&mut self, a: Act, v: Vec<f32>) {
        self.bufs[index(a)] = v;
    }
}

impl Ops for HostOps {
    type Error = std::convert::Infallible;

    fn patchify(
        &mut self,
        clip: [usize; 5],
        tubelet: usize,
        patch: usize,
    ) -> Result<(), Self::Error> {
        let tokens = cpu::patchify(self.buf(Act::Clips), clip, tubelet, patch);
        self.put(Act::Tokens, tokens);
        Ok(())
    }

    fn gemm(&mut self, g: &Gemm) -> Result<(), Self::Error> {
        let w = self.w.clone();
        let mut d = self.take(g.d);
        let lw = w.linear(g.w);
        let d_out = &mut d[..g.m * g.n];
        // The bias is written (or added) first and the product accumulates onto it.
        let acc = match (&lw.b, g.bias, g.accumulate) {
            (Some(b), true, true) => {
                cpu::add_rows(d_out, b);
                true
            }
            (Some(b), true, false) => {
                d_out.par_chunks_mut(g.n).for_each(|r| r.copy_from_slice(b));
                true
            }
            (_, _, acc) => acc,
        };
        let a = &self.bufs[index(g.a)][..g.m * g.k];
        match self.panels.get(&g.w) {
            Some(bp) => bf16::matmul_panels(d_out, a, bp, [g.m, g.k, g.n], acc),
            None => cpu::matmul_with(d_out, a, &lw.w, [g.m, g.k, g.n], acc, true),
        }
        self.put(g.d, d);
        Ok(())
    }

    fn layer_norm(
        &mut self,
        norm: Norm,
        out: Act,
        rows: usize,
        d: usize,
        position: Option<usize>,
    ) -> Result<(), Self::Error> {
        let w = self.w.clone();
        let mut x = self.take(Act::X);
        if let Some(tokens) = position {
            let pos = &w.pos;
            x[..rows * d]
                .par_chunks_mut(tokens * d)
                .for_each(|clip| clip.iter_mut().zip(pos).for_each(|(v, p)| *v += p));
        }
        let nw = w.norm(norm);
        let mut o = self.take(out);
        cpu::layer_norm(
            &x[..rows * d],
            &mut o[..rows * d],
            d,
            (&nw.gamma, &nw.beta),
            nw.eps,
        );
        self.put(out, o);
        self.put(Act::X, x);
        Ok(())
    }

    fn attention(
        &mut self,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<(), Self::Error> {
        let mut att = self.take(Act::Att);
        let qkv = &self.bufs[index(Act::Qkv)];
        let dims = [batch, tokens, heads, head_dim];
        let n = batch * tokens * heads * head_dim;
        match self.precision {
            Precision::Bf16 => cpu::attention_bf16_into(qkv, dims, scale, &mut att[..n]),
            _ => cpu::attention_into(qkv, dims, scale, &mut att[..n]),
        }
        self.put(Act::Att, att);
        Ok(())
    }

    fn gelu(&mut self, len: usize) -> Result<(), Self::Error> {
        cpu::gelu_in_place(&mut self.bufs[index(Act::Hidden)][..len]);
        Ok(())
    }

    fn mean_layer_norm(
        &mut self,
        batch: usize,
        tokens: usize,
        d: usize,
    ) -> Result<(), Self::Error> {
        let x = &self.bufs[index(Act::X)];
        // Sums in f64: a clip has up to 1568 tokens.
        let means: Vec<f32> = x[..batch * tokens * d]
            .par_chunks(tokens * d)
            .flat_map_iter(|clip| {
                let mut s = vec![0f64; d];
                for row in clip.chunks_exact(d) {
                    s.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                }
                s.into_iter().map(move |v| (v / tokens as f64) as f32)
            })
            .collect();
        let w = self.w.clone();
        let nw = w.norm(Norm::Final);
        let mut o = self.take(Act::Out);
        cpu::layer_norm(
            &means,
            &mut o[..batch * d],
            d,
            (&nw.gamma, &nw.beta),
            nw.eps,
        );
        self.put(Act::Out, o);
        Ok(())
    }
}

/// The CPU's [`FeatureEngine`]: the schedule on [`HostOps`], one batch at a time.
pub struct HostEngine {
    shape: schedule::Shape,
    precision: Precision,
    ops: Mutex<HostOps>,
}

impl std::fmt::Debug for HostEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEngine")
            .field("shape", &self.shape)
            .field("precision", &self.precision)
            .finish()
    }
}

impl HostEngine {
    /// `precision` as the CPU computes it: f32, or bf16 where
    /// [`crate::kernels::cpu_effective_precision`] chose it.
    pub fn new(w: EncoderWeights, precision: Precision) -> Self {
        let shape = w.shape;
        let ops = HostOps::new(std::sync::Arc::new(w), precision);
        Self {
            shape,
            precision: ops.precision,
            ops: Mutex::new(ops),
        }
    }

    /// The features of `clips` (`[B, 3, T, H, W]` as one slice per clip) on the host.
    pub fn run(&self, clips: &[&[f32]], keep_seq: bool) -> (Vec<f32>, [usize; 3]) {
        let plan = schedule::plan(&self.shape, clips.len(), keep_seq);
        // A poisoned lock only means another batch panicked; the buffers are rewritten anyway.
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        ops.prepare(&plan);
        let per = plan.len(Act::Clips) / clips.len().max(1);
        ops.buf_mut(Act::Clips)
            .par_chunks_mut(per.max(1))
            .zip(clips.par_iter())
            .for_each(|(dst, src)| dst.copy_from_slice(&src[..per]));
        match schedule::run(&plan, &mut *ops) {
            Ok(()) => {}
            Err(e) => match e {},
        }
        let out = ops.buf(Act::Out)[..plan.len(Act::Out)].to_vec();
        (out, plan.out_shape())
    }
}

impl FeatureEngine for HostEngine {
    fn describe(&self) -> String {
        format!("cpu, {}: host kernels", self.precision)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn clip_size(&self) -> (usize, usize) {
        (self.shape.frames, self.shape.img)
    }

    fn submit(&self, clips: &[&[f32]], keep_seq: bool) -> Result<Pending, DeviceError> {
        let want = 3 * self.shape.frames * self.shape.img * self.shape.img;
        if let Some(c) = clips.iter().find(|c| c.len() != want) {
            return Err(DeviceError::Other(format!(
                "a clip of {} values, not [3, {}, {}, {}]",
                c.len(),
                self.shape.frames,
                self.shape.img,
                self.shape.img
            )));
        }
        let (v, shape) = self.run(clips, keep_seq);
        Ok(Pending::ready(shape, v))
    }

    fn wait(&self, pending: Pending) -> Result<Vec<f32>, DeviceError> {
        pending
            .into_parts()
            .map_err(|_| DeviceError::Other("a batch submitted to another engine".into()))
    }
}
