//! The training schedule's ops on the host ([`super::train::TrainOps`]): the CPU backend's
//! products (`gemm` with transposed operands), attention with its log-sum-exps and its
//! blocked backward, and the kernels of [`crate::kernels::cpu_train`]. The twin of the CUDA
//! ops: the same steps and buffers, checked against the peer's step in the tests.

use super::train::{DType, Gather, Gemm, Layout, Rows, TrainOps, I, T};
use crate::distributed::{DistError, Group};
use crate::kernels::bf16::{from_bf16, to_bf16};
use crate::kernels::cpu;
use crate::kernels::cpu_train::{self, AdamW};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Host buffers of a [`Layout`]. A bf16 buffer holds f32 values rounded to bf16 (round to
/// nearest even) whenever written, as the GPU's bf16 buffers store them: the host twin of a
/// bf16 step computes in f32 from bf16-rounded operands, as the GPU's products and kernels do.
#[derive(Debug, Default)]
pub struct HostTrainOps {
    floats: Vec<Vec<f32>>,
    dtypes: Vec<DType>,
    indices: Vec<Vec<u32>>,
    /// What [`TrainOps::activation_dtype`] answers (f32 by default).
    act: DType,
    /// What [`TrainOps::recompute_activations`] answers (no by default: the CPU keeps them,
    /// which is faster here; the GPU's ops recompute them).
    recompute: bool,
    /// Fill new float buffers with NaN instead of 0 (a test that the schedule writes
    /// everything it reads: a device's fresh memory holds anything).
    poison: bool,
    /// A data-parallel run's all-reduces, on a thread of their own.
    comm: Option<CommThread>,
}

/// The all-reduces of a data-parallel run on a thread of their own, so that the average of
/// the gradients the backward has finished overlaps the backward of the layers before them:
/// each piece is copied out when started, averaged on the thread, and copied back when waited
/// for (no buffer is shared with the thread).
struct CommThread {
    group: Arc<Group>,
    jobs: Option<mpsc::Sender<Vec<f32>>>,
    done: mpsc::Receiver<(Vec<f32>, Result<(), DistError>)>,
    /// The pieces started and not yet waited for, oldest first.
    pending: VecDeque<T>,
    /// The copies' vectors of the last update, in the order its pieces were started (the
    /// next update's pieces are alike: no allocation after the first).
    spare: VecDeque<Vec<f32>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CommThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CommThread({:?}, {} pending)",
            self.group,
            self.pending.len()
        )
    }
}

impl CommThread {
    fn spawn(group: Arc<Group>) -> Result<Self, DistError> {
        let (jobs, inbox) = mpsc::channel::<Vec<f32>>();
        let (outbox, done) = mpsc::channel();
        let g = group.clone();
        let thread = std::thread::Builder::new()
            .name("marlin-allreduce".into())
            .spawn(move || {
                for mut v in inbox {
                    let r = g.all_reduce_mean(&mut v, "the gradients");
                    if outbox.send((v, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DistError::Unavailable(format!("the all-reduce thread: {e}")))?;
        Ok(Self {
            group,
            jobs: Some(jobs),
            done,
            pending: VecDeque::new(),
            spare: VecDeque::new(),
            thread: Some(thread),
        })
    }

    fn gone() -> DistError {
        DistError::Unavailable("the all-reduce thread stopped".into())
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the piece in flight.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HostTrainOps {
    /// Ops whose new float buffers hold NaN: a step on them equals a step on zeroed buffers
    /// only when the schedule writes every value before reading it.
    pub fn poisoned() -> Self {
        Self {
            poison: true,
            ..Self::default()
        }
    }

    /// These ops with steps built on them keeping their activations as `act` (bf16: the CPU
    /// twin of the GPU's bf16 step, for tests; no faster than f32 here).
    pub fn with_activations(self, act: DType) -> Self {
        Self { act, ..self }
    }

    /// These ops with steps built on them recomputing the blocks' LayerNorm and GELU outputs
    /// in the backward (as the CUDA ops' steps do) instead of keeping them.
    pub fn recomputing(self, recompute: bool) -> Self {
        Self { recompute, ..self }
    }

    /// Round the values of `t` to bf16 where its buffer stores bf16.
    fn settle(&mut self, t: T) {
        if self.dtypes.get(t.buf) == Some(&DType::Bf16) {
            self.floats[t.buf][t.off..t.off + t.len]
                .par_iter_mut()
                .for_each(|v| *v = from_bf16(to_bf16(*v)));
        }
    }
}

impl HostTrainOps {
    fn s(&self, t: T) -> &[f32] {
        &self.floats[t.buf][t.off..t.off + t.len]
    }

    /// Buffer `buf` taken out (to write into it while reading the others), put back by
    /// [`HostTrainOps::put`]. A schedule never reads the buffer an op writes, except where
    /// the op says so (in-place gradients).
    fn take(&mut self, buf: usize) -> Vec<f32> {
        std::mem::take(&mut self.floats[buf])
    }

    fn put(&mut self, buf: usize, v: Vec<f32>) {
        self.floats[buf] = v;
    }

    /// `f(source offset, destination offset)` of every row pair of `g`, batch by batch (a
    /// scatter into rows shared by every batch adds them in this fixed order).
    fn row_pairs(&self, g: &Gather, mut f: impl FnMut(usize, usize)) {
        let idx = g.idx.map(|i| &self.indices[i.buf][..]);
        let row = |r: &Rows, b: usize, j: usize| (b * r.per_batch + r.start + j) * g.width;
        for b in 0..g.batch {
            for j in 0..g.count {
                let from = idx.map_or(j, |ix| ix[b * g.count + j] as usize);
                f(row(&g.src, b, from), row(&g.dst, b, j));
            }
        }
    }

    /// Run `f` on the slice `out` and the rest of the buffers.
    fn write(&mut self, out: T, f: impl FnOnce(&Self, &mut [f32])) {
        let mut v = self.take(out.buf);
        f(self, &mut v[out.off..out.off + out.len]);
        self.put(out.buf, v);
        self.settle(out);
    }
}

impl TrainOps for HostTrainOps {
    type Error = Infallible;

    fn activation_dtype(&self) -> DType {
        self.act
    }

    fn recompute_activations(&self) -> bool {
        self.recompute
    }

    fn prepare(&mut self, layout: &Layout) -> Result<(), Infallible> {
        let fresh = if self.poison { f32::NAN } else { 0.0 };
        self.floats = layout.floats.iter().map(|(_, n)| vec![fresh; *n]).collect();
        self.dtypes = (0..layout.floats.len()).map(|b| layout.dtype(b)).collect();
        self.indices = layout.indices.iter().map(|(_, n)| vec![0; *n]).collect();
        Ok(())
    }

    fn upload(&mut self, t: T, values: &[f32]) -> Result<(), Infallible> {
        self.floats[t.buf][t.off..t.off + t.len].copy_from_slice(&values[..t.len]);
        self.settle(t);
        Ok(())
    }

    fn upload_index(&mut self, i: I, values: &[u32]) -> Result<(), Infallible> {
        self.indices[i.buf][..i.len].copy_from_slice(&values[..i.len]);
        Ok(())
    }

    fn read(&mut self, t: T) -> Result<Vec<f32>, Infallible> {
        Ok(self.s(t).to_vec())
    }

    fn fill(&mut self, t: T, value: f32) -> Result<(), Infallible> {
        self.floats[t.buf][t.off..t.off + t.len]
            .par_iter_mut()
            .for_each(|v| *v = value);
        self.settle(t);
        Ok(())
    }

    fn copy(&mut self, src: T, dst: T) -> Result<(), Infallible> {
        if src.buf == dst.buf {
            self.floats[src.buf].copy_within(src.off..src.off + src.len, dst.off);
            self.settle(dst);
        } else {
            self.write(dst, |me, d| d.copy_from_slice(me.s(src)));
        }
        Ok(())
    }

    fn patchify(
        &mut self,
        clips: T,
        dims: [usize; 5],
        tubelet: usize,
        patch: usize,
        out: T,
    ) -> Result<(), Infallible> {
        let tokens = cpu::patchify(self.s(clips), dims, tubelet, patch);
        self.upload(out, &tokens)
    }

    fn gather(&mut self, g: &Gather) -> Result<(), Infallible> {
        let (src, dst) = (g.src, g.dst);
        self.write(dst.t, |me, d| {
            let s = me.s(src.t);
            me.row_pairs(g, |si, di| {
                let (sr, dr) = (&s[si..si + g.width], &mut d[di..di + g.width]);
                if g.accumulate {
                    dr.iter_mut().zip(sr).for_each(|(d, s)| *d += s);
                } else {
                    dr.copy_from_slice(sr);
                }
            });
        });
        Ok(())
    }

    fn scatter_add(&mut self, g: &Gather) -> Result<(), Infallible> {
        let (src, dst) = (g.src, g.dst);
        self.write(src.t, |me, s| {
            let d = me.s(dst.t);
            me.row_pairs(g, |si, di| {
                s[si..si + g.width]
                    .iter_mut()
                    .zip(&d[di..di + g.width])
                    .for_each(|(s, d)| *s += d);
            });
        });
        Ok(())
    }

    fn gemm(&mut self, g: &Gemm) -> Result<(), Infallible> {
        let g = *g;
        self.write(g.d, |me, d| {
            let mut acc = g.accumulate;
            if let Some(b) = g.bias {
                let b = me.s(b);
                match acc {
                    true => cpu::add_rows(d, b),
                    false => d.par_chunks_mut(g.n).for_each(|r| r.copy_from_slice(b)),
                }
                acc = true;
            }
            cpu::matmul_t(d, me.s(g.a), g.ta, me.s(g.b), g.tb, [g.m, g.k, g.n], acc);
        });
        Ok(())
    }

    fn col_sum(&mut self, src: T, width: usize, col0: usize, dst: T) -> Result<(), Infallible> {
        self.write(dst, |me, d| cpu_train::col_sum(me.s(src), width, col0, d));
        Ok(())
    }

    fn layer_norm(
        &mut self,
        x: T,
        gamma: T,
        beta: T,
        eps: f32,
        d: usize,
        out: T,
        stats: T,
    ) -> Result<(), Infallible> {
        let mut st = self.take(stats.buf);
        self.write(out, |me, o| {
            cpu_train::layer_norm_stats(
                me.s(x),
                (me.s(gamma), me.s(beta)),
                eps,
                d,
                o,
                &mut st[stats.off..stats.off + stats.len],
            )
        });
        self.put(stats.buf, st);
        Ok(())
    }

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
    ) -> Result<(), Infallible> {
        // dgamma and dbeta are disjoint slices of one gradient buffer: taken out together.
        let mut grads = self.take(dgamma.buf);
        let (dg, db) = disjoint_mut(&mut grads, dgamma, dbeta);
        self.write(dx, |me, dxs| {
            cpu_train::layer_norm_backward(
                me.s(x),
                me.s(stats),
                me.s(gamma),
                me.s(dout),
                d,
                dxs,
                dg,
                db,
            )
        });
        self.put(dgamma.buf, grads);
        Ok(())
    }

    fn attention(
        &mut self,
        qkv: T,
        [b, n, h, hd]: [usize; 4],
        scale: f32,
        out: T,
        lse: T,
    ) -> Result<(), Infallible> {
        let mut l = self.take(lse.buf);
        let o = cpu::attention_lse(
            self.s(qkv),
            b,
            n,
            h,
            hd,
            scale,
            Some(&mut l[lse.off..lse.off + lse.len]),
        );
        self.put(lse.buf, l);
        self.upload(out, &o)
    }

    fn attention_backward(
        &mut self,
        qkv: T,
        out: T,
        dout: T,
        lse: T,
        [b, n, h, hd]: [usize; 4],
        scale: f32,
        dqkv: T,
    ) -> Result<(), Infallible> {
        let g = cpu::attention_backward(
            self.s(qkv),
            self.s(out),
            self.s(dout),
            self.s(lse),
            b,
            n,
            h,
            hd,
            scale,
        );
        self.upload(dqkv, &g)
    }

    fn gelu(&mut self, x: T, out: T) -> Result<(), Infallible> {
        self.copy(x, out)?;
        let o = out;
        cpu::gelu_in_place(&mut self.floats[o.buf][o.off..o.off + o.len]);
        self.settle(o);
        Ok(())
    }

    fn gelu_backward(&mut self, x: T, grad: T) -> Result<(), Infallible> {
        self.write(grad, |me, g| cpu::gelu_backward_in_place(me.s(x), g));
        Ok(())
    }

    fn leaky_relu(&mut self, x: T, slope: f32, out: T) -> Result<(), Infallible> {
        self.write(out, |me, o| cpu_train::leaky_relu(me.s(x), slope, o));
        Ok(())
    }

    fn leaky_relu_backward(&mut self, x: T, slope: f32, grad: T) -> Result<(), Infallible> {
        self.write(grad, |me, g| {
            cpu_train::leaky_relu_backward(me.s(x), slope, g)
        });
        Ok(())
    }

    fn mse(&mut self, pred: T, target: T, dpred: Option<T>, loss: T) -> Result<(), Infallible> {
        let v = match dpred {
            Some(dp) => {
                let mut v = 0.0;
                self.write(dp, |me, d| {
                    v = cpu_train::mse(me.s(pred), me.s(target), Some(d));
                });
                v
            }
            None => cpu_train::mse(self.s(pred), self.s(target), None),
        };
        self.upload(loss.at(0, 1), &[v as f32])
    }

    fn mean(&mut self, x: T, loss: T) -> Result<(), Infallible> {
        let v = cpu_train::mean(self.s(x));
        self.upload(loss.at(0, 1), &[v as f32])
    }

    fn on_host(&mut self, t: T, f: &mut dyn FnMut(&mut [f32])) -> Result<(), Infallible> {
        f(&mut self.floats[t.buf][t.off..t.off + t.len]);
        self.settle(t);
        Ok(())
    }

    fn all_reduce_start(
        &mut self,
        t: T,
        group: &Arc<Group>,
    ) -> Result<Result<(), DistError>, Infallible> {
        if !self
            .comm
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.group, group))
        {
            match CommThread::spawn(group.clone()) {
                Ok(c) => self.comm = Some(c),
                Err(e) => return Ok(Err(e)),
            }
        }
        let Some(comm) = self.comm.as_mut() else {
            return Ok(Err(CommThread::gone()));
        };
        let mut v = comm.spare.pop_front().unwrap_or_default();
        v.clear();
        v.extend_from_slice(&self.floats[t.buf][t.off..t.off + t.len]);
        match comm.jobs.as_ref().map(|j| j.send(v)) {
            Some(Ok(())) => {
                comm.pending.push_back(t);
                Ok(Ok(()))
            }
            _ => Ok(Err(CommThread::gone())),
        }
    }

    fn all_reduce_wait(&mut self) -> Result<Result<(), DistError>, Infallible> {
        let Some(comm) = self.comm.as_mut() else {
            return Ok(Ok(()));
        };
        let mut res = Ok(());
        while let Some(t) = comm.pending.pop_front() {
            match comm.done.recv() {
                Ok((v, r)) => {
                    if r.is_ok() {
                        self.floats[t.buf][t.off..t.off + t.len].copy_from_slice(&v);
                    }
                    comm.spare.push_back(v);
                    if res.is_ok() {
                        res = r;
                    }
                }
                Err(_) => {
                    comm.pending.clear();
                    return Ok(Err(CommThread::gone()));
                }
            }
        }
        Ok(res)
    }

    fn adamw(&mut self, p: T, g: T, m: T, v: T, h: &AdamW) -> Result<(), Infallible> {
        let (mut mb, mut vb) = (self.take(m.buf), self.take(v.buf));
        self.write(p, |me, ps| {
            cpu_train::adamw(
                ps,
                me.s(g),
                &mut mb[m.off..m.off + m.len],
                &mut vb[v.off..v.off + v.len],
                h,
            )
        });
        self.put(m.buf, mb);
        self.put(v.buf, vb);
        Ok(())
    }
}

/// The slices `a` and `b` of one buffer, both writable (they must not overlap).
fn disjoint_mut(v: &mut [f32], a: T, b: T) -> (&mut [f32], &mut [f32]) {
    assert!(
        a.off + a.len <= b.off || b.off + b.len <= a.off,
        "overlapping slices"
    );
    if a.off < b.off {
        let (lo, hi) = v.split_at_mut(b.off);
        (&mut lo[a.off..a.off + a.len], &mut hi[..b.len])
    } else {
        let (lo, hi) = v.split_at_mut(a.off);
        (&mut hi[..a.len], &mut lo[b.off..b.off + b.len])
    }
}
