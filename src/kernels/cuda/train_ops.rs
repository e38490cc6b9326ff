//! The training engine's ops ([`crate::engine::train::TrainOps`]) on an NVIDIA GPU in f32
//! (products in fp32 or tf32): cuBLASLt for every product (the transposes and the bias in the
//! descriptors of [`lt::describe_train`], one descriptor and algorithm per product, kept), the
//! kernels of `train.cu` for the small ops and f32 attention with its backward, `encoder.cu`'s
//! patchify. Everything is queued on one stream; `read` waits for it.

use super::engine::{device_error, DevBuf, Module};
use super::lt::{self, LtGemm, LtHandle};
use super::nvrtc;
use crate::device_error::DeviceError;
use crate::engine::train::{Gather, Gemm, Layout, TrainOps, I, T};
use crate::kernels::cpu_train::AdamW;
use crate::kernels::Precision;
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// cuBLASLt's workspace.
const WORKSPACE: usize = 32 << 20;

/// Register widths of the f32 attention kernels (`attention_*_f32_hdN`).
const ATTENTION_WIDTHS: [usize; 3] = [32, 64, 128];

/// The kernels of `train.cu` and `encoder.cu` the ops launch.
struct Kernels {
    fill: sys::CUfunction,
    gather: sys::CUfunction,
    scatter_add: sys::CUfunction,
    col_sum: sys::CUfunction,
    ln_fwd: sys::CUfunction,
    ln_bwd: sys::CUfunction,
    gelu_fwd: sys::CUfunction,
    gelu_bwd: sys::CUfunction,
    leaky: sys::CUfunction,
    leaky_bwd: sys::CUfunction,
    sq_diff_sum: sys::CUfunction,
    sum: sys::CUfunction,
    store_scaled: sys::CUfunction,
    adamw: sys::CUfunction,
    patchify: sys::CUfunction,
    delta: sys::CUfunction,
    /// Per register width: forward, dq, dkv.
    attention: [[sys::CUfunction; 3]; 3],
    _modules: Vec<Module>,
}

// SAFETY: CUfunction handles are plain identifiers valid for the modules' lifetime (kept here).
unsafe impl Send for Kernels {}

fn load_kernels(arch: u32) -> Result<Kernels, DeviceError> {
    let load = |s: &nvrtc::Source| -> Result<Module, DeviceError> {
        let c = nvrtc::compile(s, arch, None).map_err(DeviceError::Other)?;
        Module::load(&c.image).map_err(|e| {
            DeviceError::Other(format!("{}: cannot load the compiled module: {e}", s.file))
        })
    };
    let (train, enc) = (load(&nvrtc::TRAIN)?, load(&nvrtc::ENCODER)?);
    let f = |m: &Module, n: &str| m.function(n).map_err(DeviceError::Other);
    let mut attention = [[std::ptr::null_mut(); 3]; 3];
    for (slot, w) in attention.iter_mut().zip(ATTENTION_WIDTHS) {
        *slot = [
            f(&train, &format!("attention_fwd_f32_hd{w}"))?,
            f(&train, &format!("attention_bwd_dq_f32_hd{w}"))?,
            f(&train, &format!("attention_bwd_dkv_f32_hd{w}"))?,
        ];
    }
    Ok(Kernels {
        fill: f(&train, "fill_f32")?,
        gather: f(&train, "gather_rows_f32")?,
        scatter_add: f(&train, "scatter_add_rows_f32")?,
        col_sum: f(&train, "col_sum_f32")?,
        ln_fwd: f(&train, "layer_norm_fwd_f32")?,
        ln_bwd: f(&train, "layer_norm_bwd_f32")?,
        gelu_fwd: f(&train, "gelu_fwd_f32")?,
        gelu_bwd: f(&train, "gelu_bwd_f32")?,
        leaky: f(&train, "leaky_relu_f32")?,
        leaky_bwd: f(&train, "leaky_relu_bwd_f32")?,
        sq_diff_sum: f(&train, "sq_diff_sum_f32")?,
        sum: f(&train, "sum_f32")?,
        store_scaled: f(&train, "store_scaled_f32")?,
        adamw: f(&train, "adamw_f32")?,
        patchify: f(&enc, "patchify_f32")?,
        delta: f(&train, "attention_delta_f32")?,
        attention,
        _modules: vec![train, enc],
    })
}

/// The training engine's buffers and kernels on one GPU.
pub struct CudaTrainOps {
    // Dropped in this order after `Drop::drop` bound the context and drained the stream:
    // descriptors and device memory first, the stream and the context last.
    gemms: HashMap<Gemm, LtGemm>,
    floats: Vec<DevBuf>,
    indices: Vec<DevBuf>,
    workspace: DevBuf,
    /// One f64: the sums of the losses.
    acc: DevBuf,
    /// Attention's backward: the rows' `dO·O` (grown to the largest call).
    delta: Option<DevBuf>,
    kernels: Kernels,
    lt: LtHandle,
    precision: Precision,
    name: String,
    /// Clips per batch of the step built last (out-of-memory errors name it).
    batch: usize,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the raw handles (modules, descriptors, device pointers) belong to this value's
// context and are used by one thread at a time (`&mut self`).
unsafe impl Send for CudaTrainOps {}

impl std::fmt::Debug for CudaTrainOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaTrainOps({}, {:?}, {} buffers)",
            self.name,
            self.precision,
            self.floats.len()
        )
    }
}

impl Drop for CudaTrainOps {
    fn drop(&mut self) {
        // The buffers and modules are freed in this context, after the queued work.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the stream is live until the fields drop, after this.
        unsafe {
            let _ = result::stream::synchronize(self.stream.cu_stream());
        }
    }
}

fn drv(e: DriverError) -> DeviceError {
    device_error(e, 0)
}

/// Blocks of 256 threads for `n` items of a grid-stride kernel.
fn grid_1d(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1)
}

macro_rules! args {
    ($($v:expr),* $(,)?) => {
        [$(&$v as *const _ as *mut c_void),*]
    };
}

impl CudaTrainOps {
    /// The ops on GPU `ordinal` with products in `precision` (fp32 or tf32; bf16 needs the
    /// engine's bf16 tapes, not written yet).
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self, DeviceError> {
        if precision == Precision::Bf16 {
            return Err(DeviceError::Other(
                "the training engine's CUDA step computes in fp32 or tf32 (bf16 is not written yet): use --precision tf32".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        ctx.bind_to_thread().map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = (major * 10 + minor) as u32;
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let stream = ctx.new_stream().map_err(drv)?;
        let lt = LtHandle::new().map_err(DeviceError::Other)?;
        let kernels = load_kernels(arch)?;
        Ok(Self {
            gemms: HashMap::new(),
            floats: Vec::new(),
            indices: Vec::new(),
            workspace: DevBuf::new(WORKSPACE).map_err(drv)?,
            acc: DevBuf::new(8).map_err(drv)?,
            delta: None,
            kernels,
            lt,
            precision,
            name,
            batch: 0,
            stream,
            ctx,
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Device memory of the step's buffers, in bytes.
    pub fn buffer_bytes(&self) -> usize {
        self.floats
            .iter()
            .chain(&self.indices)
            .map(|b| b.bytes)
            .sum()
    }

    /// Driver errors as device errors; out of memory names the step's batch size.
    fn fail(&self) -> impl Fn(DriverError) -> DeviceError {
        let batch = self.batch;
        move |e| device_error(e, batch)
    }

    /// Wait for the queued work.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        // SAFETY: the stream is live.
        unsafe { result::stream::synchronize(self.stream.cu_stream()) }.map_err(self.fail())
    }

    fn ptr(&self, t: T) -> u64 {
        self.floats[t.buf].ptr + 4 * t.off as u64
    }

    fn iptr(&self, i: I) -> u64 {
        self.indices[i.buf].ptr
    }

    fn st(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), DeviceError> {
        // SAFETY: `f` is a kernel of a loaded module whose parameters are exactly `args`
        // (pointers to values of the kernel's parameter types, alive for this call); the
        // device pointers among them address buffers of the layout's sizes.
        unsafe { result::launch_kernel(f, grid, (block, 1, 1), shared, self.st(), args) }
            .map_err(self.fail())
    }

    fn elementwise(
        &self,
        f: sys::CUfunction,
        n: usize,
        args: &mut [*mut c_void],
    ) -> Result<(), DeviceError> {
        self.launch(f, grid_1d(n), 256, 0, args)
    }

    fn gather_args(&self, g: &Gather) -> [u64; 3] {
        [
            self.ptr(g.src.t),
            g.idx.map_or(0, |i| self.iptr(i)),
            self.ptr(g.dst.t),
        ]
    }

    fn launch_gather(&self, f: sys::CUfunction, g: &Gather) -> Result<(), DeviceError> {
        let [src, idx, dst] = self.gather_args(g);
        let (sp, ss) = (g.src.per_batch as i64, g.src.start as i64);
        let (dp, ds) = (g.dst.per_batch as i64, g.dst.start as i64);
        let (b, c, w) = (g.batch as i32, g.count as i32, g.width as i32);
        let acc = i32::from(g.accumulate);
        let mut a = args![src, sp, ss, idx, dst, dp, ds, b, c, w, acc];
        let rows = (g.batch * g.count).max(1) as u32;
        self.launch(f, (rows, 1, 1), 128, 0, &mut a)
    }

    /// The register width of the attention kernels for head size `hd`.
    /// The attention kernels' grid has one row per (clip, head): CUDA allows 65535.
    fn attention_rows(b: usize, h: usize) -> Result<u32, DeviceError> {
        match u32::try_from(b * h) {
            Ok(r) if r <= 65535 => Ok(r),
            _ => Err(DeviceError::Other(format!(
                "the training engine's CUDA attention takes at most 65535 clips x heads per \
                 call, not {b} x {h}: use a smaller --batch-size"
            ))),
        }
    }

    fn attention_width(hd: usize) -> Result<usize, DeviceError> {
        ATTENTION_WIDTHS
            .iter()
            .position(|&w| hd <= w)
            .ok_or_else(|| {
                DeviceError::Other(format!(
                    "the training engine's CUDA attention takes head sizes up to 128, not {hd}"
                ))
            })
    }

    /// `loss[0] = acc · scale` after `f` summed into the zeroed accumulator.
    fn reduce_into(
        &self,
        loss: T,
        scale: f64,
        f: impl FnOnce(u64) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        // SAFETY: `acc` holds 8 bytes; the memset is ordered on the stream.
        unsafe { result::memset_d8_async(self.acc.ptr, 0, 8, self.st()) }.map_err(self.fail())?;
        f(self.acc.ptr)?;
        let (acc, out) = (self.acc.ptr, self.ptr(loss));
        let mut a = args![acc, out, scale];
        self.launch(self.kernels.store_scaled, (1, 1, 1), 32, 0, &mut a)
    }
}

impl TrainOps for CudaTrainOps {
    type Error = DeviceError;

    fn set_batch(&mut self, batch: usize) {
        self.batch = batch;
    }

    fn prepare(&mut self, layout: &Layout) -> Result<(), DeviceError> {
        // The step may be built on another thread than the one that opened the GPU.
        self.ctx.bind_to_thread().map_err(self.fail())?;
        self.synchronize()?;
        // The descriptors hold bias pointers into the old buffers.
        self.gemms.clear();
        self.floats.clear();
        self.indices.clear();
        for (_, n) in &layout.floats {
            self.floats.push(DevBuf::new(4 * n).map_err(self.fail())?);
        }
        for (_, n) in &layout.indices {
            self.indices.push(DevBuf::new(4 * n).map_err(self.fail())?);
        }
        // Zeroed, as the host ops' buffers are: a schedule may read a buffer it has not
        // written this step (a gradient its update did not touch, a loss slot it skipped).
        for b in self.floats.iter().chain(&self.indices) {
            // SAFETY: the whole allocation of a live buffer, on this engine's stream.
            unsafe { result::memset_d8_async(b.ptr, 0, b.bytes, self.st()) }
                .map_err(self.fail())?;
        }
        self.synchronize()
    }

    fn upload(&mut self, t: T, values: &[f32]) -> Result<(), DeviceError> {
        // SAFETY: the slice lies inside its buffer; the copy is complete when the stream is
        // synchronised below, before `values` can go.
        unsafe { result::memcpy_htod_async(self.ptr(t), &values[..t.len], self.st()) }
            .map_err(self.fail())?;
        self.synchronize()
    }

    fn upload_index(&mut self, i: I, values: &[u32]) -> Result<(), DeviceError> {
        // SAFETY: as `upload`.
        unsafe { result::memcpy_htod_async(self.iptr(i), &values[..i.len], self.st()) }
            .map_err(self.fail())?;
        self.synchronize()
    }

    fn read(&mut self, t: T) -> Result<Vec<f32>, DeviceError> {
        // Once per update: keeps this thread on the engine's context (burn's CUDA backend may
        // have made another current for validation).
        self.ctx.bind_to_thread().map_err(self.fail())?;
        self.synchronize()?;
        let mut v = vec![0f32; t.len];
        // SAFETY: the slice lies inside its buffer; the stream is idle.
        unsafe { result::memcpy_dtoh_sync(&mut v, self.ptr(t)) }.map_err(self.fail())?;
        Ok(v)
    }

    fn fill(&mut self, t: T, value: f32) -> Result<(), DeviceError> {
        let (x, n) = (self.ptr(t), t.len as i64);
        let mut a = args![x, n, value];
        self.elementwise(self.kernels.fill, t.len, &mut a)
    }

    fn copy(&mut self, src: T, dst: T) -> Result<(), DeviceError> {
        // SAFETY: both slices lie inside their buffers and do not overlap (the schedule's
        // copies are between distinct tensors).
        unsafe { result::memcpy_dtod_async(self.ptr(dst), self.ptr(src), 4 * src.len, self.st()) }
            .map_err(self.fail())
    }

    fn patchify(
        &mut self,
        clips: T,
        dims: [usize; 5],
        tubelet: usize,
        patch: usize,
        out: T,
    ) -> Result<(), DeviceError> {
        let (src, dst) = (self.ptr(clips), self.ptr(out));
        let [b, c, t, h, w] = dims.map(|v| v as i32);
        let (tu, pa) = (tubelet as i32, patch as i32);
        let mut a = args![src, dst, b, c, t, h, w, tu, pa];
        self.elementwise(self.kernels.patchify, out.len, &mut a)
    }

    fn gather(&mut self, g: &Gather) -> Result<(), DeviceError> {
        self.launch_gather(self.kernels.gather, g)
    }

    fn scatter_add(&mut self, g: &Gather) -> Result<(), DeviceError> {
        self.launch_gather(self.kernels.scatter_add, g)
    }

    fn gemm(&mut self, g: &Gemm) -> Result<(), DeviceError> {
        if !self.gemms.contains_key(g) {
            let desc = lt::describe_train(g, self.precision);
            let bias = g.bias.map(|b| self.ptr(b));
            // cuBLASLt's A, B, C = D (`describe_train`): slices of the flat buffers, aligned to
            // their offsets only.
            let (a, b, d) = (self.ptr(g.b), self.ptr(g.a), self.ptr(g.d));
            let lg = LtGemm::new(&self.lt, &desc, bias, WORKSPACE, Some([a, b, d, d]))
                .map_err(DeviceError::Other)?;
            self.gemms.insert(*g, lg);
        }
        let lg = &self.gemms[g];
        // cuBLASLt's first operand is the product's B buffer, its second the A buffer
        // (`describe_train`).
        let (a, b, d) = (self.ptr(g.b), self.ptr(g.a), self.ptr(g.d));
        // SAFETY: the buffers have the described layouts (C = D when accumulating), the
        // workspace holds WORKSPACE bytes, and all live until the stream is drained.
        unsafe { lg.run(&self.lt, a, b, d, self.workspace.ptr, self.st()) }
            .map_err(DeviceError::Other)
    }

    fn col_sum(&mut self, src: T, width: usize, col0: usize, dst: T) -> Result<(), DeviceError> {
        let rows = (src.len / width.max(1)) as i64;
        let (s, d) = (self.ptr(src), self.ptr(dst));
        let (w, c0, cols) = (width as i32, col0 as i32, dst.len as i32);
        let mut a = args![s, rows, w, c0, cols, d];
        let splits = rows.clamp(1, 128) as u32;
        let grid = (dst.len.div_ceil(256).max(1) as u32, splits, 1);
        self.launch(self.kernels.col_sum, grid, 256, 0, &mut a)
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
    ) -> Result<(), DeviceError> {
        let rows = (x.len / d.max(1)) as i64;
        let (xp, gp, bp, yp, sp) = (
            self.ptr(x),
            self.ptr(gamma),
            self.ptr(beta),
            self.ptr(out),
            self.ptr(stats),
        );
        let di = d as i32;
        let mut a = args![xp, gp, bp, yp, sp, rows, di, eps];
        let grid = ((rows as usize).div_ceil(8).max(1) as u32, 1, 1);
        self.launch(self.kernels.ln_fwd, grid, 256, 0, &mut a)
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
    ) -> Result<(), DeviceError> {
        let rows = (x.len / d.max(1)) as i64;
        let (xp, sp, gp, dyp, dxp, dgp, dbp) = (
            self.ptr(x),
            self.ptr(stats),
            self.ptr(gamma),
            self.ptr(dout),
            self.ptr(dx),
            self.ptr(dgamma),
            self.ptr(dbeta),
        );
        let di = d as i32;
        let mut a = args![xp, sp, gp, dyp, dxp, dgp, dbp, rows, di];
        let grid = ((rows as usize).div_ceil(8).max(1) as u32, 1, 1);
        self.launch(self.kernels.ln_bwd, grid, 256, (8 * d) as u32, &mut a)
    }

    fn attention(
        &mut self,
        qkv: T,
        [b, n, h, hd]: [usize; 4],
        scale: f32,
        out: T,
        lse: T,
    ) -> Result<(), DeviceError> {
        let w = Self::attention_width(hd)?;
        let (q, o, l) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let (ni, hi, hdi) = (n as i32, h as i32, hd as i32);
        let mut a = args![q, o, l, ni, hi, hdi, scale];
        let grid = (
            n.div_ceil(128).max(1) as u32,
            Self::attention_rows(b, h)?,
            1,
        );
        self.launch(self.kernels.attention[w][0], grid, 128, 0, &mut a)
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
    ) -> Result<(), DeviceError> {
        let w = Self::attention_width(hd)?;
        let need = 4 * b * h * n;
        if self.delta.as_ref().is_none_or(|d| d.bytes < need) {
            self.synchronize()?;
            self.delta = Some(DevBuf::new(need).map_err(self.fail())?);
        }
        let delta = self.delta.as_ref().map_or(0, |d| d.ptr);
        let (q, o, g, l, dq) = (
            self.ptr(qkv),
            self.ptr(out),
            self.ptr(dout),
            self.ptr(lse),
            self.ptr(dqkv),
        );
        let (rows, ni, hi, hdi) = ((b * n) as i64, n as i32, h as i32, hd as i32);
        let mut a = args![o, g, delta, rows, ni, hi, hdi];
        self.elementwise(self.kernels.delta, b * n * h, &mut a)?;
        let grid = (n.div_ceil(64).max(1) as u32, Self::attention_rows(b, h)?, 1);
        for k in [1, 2] {
            let mut a = args![q, g, l, delta, dq, ni, hi, hdi, scale];
            self.launch(self.kernels.attention[w][k], grid, 64, 0, &mut a)?;
        }
        Ok(())
    }

    fn gelu(&mut self, x: T, out: T) -> Result<(), DeviceError> {
        let (xp, yp, n) = (self.ptr(x), self.ptr(out), x.len as i64);
        let mut a = args![xp, yp, n];
        self.elementwise(self.kernels.gelu_fwd, x.len, &mut a)
    }

    fn gelu_backward(&mut self, x: T, grad: T) -> Result<(), DeviceError> {
        let (xp, gp, n) = (self.ptr(x), self.ptr(grad), x.len as i64);
        let mut a = args![xp, gp, n];
        self.elementwise(self.kernels.gelu_bwd, x.len, &mut a)
    }

    fn leaky_relu(&mut self, x: T, slope: f32, out: T) -> Result<(), DeviceError> {
        let (xp, yp, n) = (self.ptr(x), self.ptr(out), x.len as i64);
        let mut a = args![xp, yp, n, slope];
        self.elementwise(self.kernels.leaky, x.len, &mut a)
    }

    fn leaky_relu_backward(&mut self, x: T, slope: f32, grad: T) -> Result<(), DeviceError> {
        let (xp, gp, n) = (self.ptr(x), self.ptr(grad), x.len as i64);
        let mut a = args![xp, gp, n, slope];
        self.elementwise(self.kernels.leaky_bwd, x.len, &mut a)
    }

    fn mse(&mut self, pred: T, target: T, dpred: Option<T>, loss: T) -> Result<(), DeviceError> {
        let n = pred.len;
        let (p, t, d) = (
            self.ptr(pred),
            self.ptr(target),
            dpred.map_or(0, |d| self.ptr(d)),
        );
        let (nn, scale) = (n as i64, 2.0f32 / n.max(1) as f32);
        self.reduce_into(loss, 1.0 / n.max(1) as f64, |acc| {
            let mut a = args![p, t, d, nn, scale, acc];
            self.elementwise(self.kernels.sq_diff_sum, n, &mut a)
        })
    }

    fn mean(&mut self, x: T, loss: T) -> Result<(), DeviceError> {
        let (xp, n) = (self.ptr(x), x.len as i64);
        self.reduce_into(loss, 1.0 / x.len.max(1) as f64, |acc| {
            let mut a = args![xp, n, acc];
            self.elementwise(self.kernels.sum, x.len, &mut a)
        })
    }

    fn adamw(&mut self, p: T, g: T, m: T, v: T, h: &AdamW) -> Result<(), DeviceError> {
        let c1 = 1.0 - h.beta1.powi(h.step as i32);
        let c2 = 1.0 - h.beta2.powi(h.step as i32);
        let (pp, gp, mp, vp, n) = (
            self.ptr(p),
            self.ptr(g),
            self.ptr(m),
            self.ptr(v),
            p.len as i64,
        );
        let (lr, b1, b2, eps, wd) = (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
        let mut a = args![pp, gp, mp, vp, n, lr, b1, b2, eps, wd, c1, c2];
        self.elementwise(self.kernels.adamw, p.len, &mut a)
    }
}
