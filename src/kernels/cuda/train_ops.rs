//! The training engine's ops ([`crate::engine::train::TrainOps`]) on an NVIDIA GPU: f32 buffers
//! with products in fp32 or tf32, or (bf16) the blocks' activations in bf16 buffers with their
//! products on bf16 operands and f32 sums. cuBLASLt for every product (the transposes and the
//! bias in the descriptors of [`lt::describe_train`], one descriptor and algorithm per product,
//! kept); bf16 attention on cuDNN's fused SDPA forward (with its statistics) and backward where
//! cuDNN has them (9.17.0 or newer), otherwise, and in f32, on `train.cu`'s CUDA-core kernels;
//! `train.cu` for the small ops, `encoder.cu`'s patchify. Everything is queued on one stream;
//! `read` waits for it.

use super::engine::{device_error, DevBuf, Module};
use super::lt::{self, LtGemm, LtHandle};
use super::nvrtc;
use super::sdpa::{Cudnn, SdpaLayout, SdpaPass, SdpaTrain};
use crate::device_error::DeviceError;
use crate::distributed::{DistError, Group};
use crate::engine::train::{all_reduce_on_host, DType, Gather, Gemm, Layout, TrainOps, I, T};
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
    /// The bf16 twins (bf16 activations, f32 arithmetic).
    fill_bf16: sys::CUfunction,
    /// f32 → bf16, bf16 → f32.
    convert: [sys::CUfunction; 2],
    col_sum_bf16: sys::CUfunction,
    ln_fwd_bf16: sys::CUfunction,
    gelu_fwd_bf16: sys::CUfunction,
    gelu_bwd_bf16: sys::CUfunction,
    delta_bf16: sys::CUfunction,
    attention_bf16: [[sys::CUfunction; 3]; 3],
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
    let attention_kernels = |t: &str| -> Result<[[sys::CUfunction; 3]; 3], DeviceError> {
        let mut k = [[std::ptr::null_mut(); 3]; 3];
        for (slot, w) in k.iter_mut().zip(ATTENTION_WIDTHS) {
            *slot = [
                f(&train, &format!("attention_fwd_{t}_hd{w}"))?,
                f(&train, &format!("attention_bwd_dq_{t}_hd{w}"))?,
                f(&train, &format!("attention_bwd_dkv_{t}_hd{w}"))?,
            ];
        }
        Ok(k)
    };
    let (attention, attention_bf16) = (attention_kernels("f32")?, attention_kernels("bf16")?);
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
        fill_bf16: f(&train, "fill_bf16")?,
        convert: [
            f(&train, "convert_f32_bf16")?,
            f(&train, "convert_bf16_f32")?,
        ],
        col_sum_bf16: f(&train, "col_sum_bf16")?,
        ln_fwd_bf16: f(&train, "layer_norm_fwd_bf16")?,
        gelu_fwd_bf16: f(&train, "gelu_fwd_bf16")?,
        gelu_bwd_bf16: f(&train, "gelu_bwd_bf16")?,
        delta_bf16: f(&train, "attention_delta_bf16")?,
        attention_bf16,
        _modules: vec![train, enc],
    })
}

/// The training engine's buffers and kernels on one GPU.
pub struct CudaTrainOps {
    // Dropped in this order after `Drop::drop` bound the context and drained the stream:
    // descriptors and device memory first, the stream and the context last.
    gemms: HashMap<Gemm, LtGemm>,
    /// bf16 attention's cuDNN plans (forward with statistics, backward) per layout and scale;
    /// None where cuDNN could not build them (CUDA-core kernels then).
    sdpa: HashMap<([usize; 4], u32), Option<[SdpaTrain; 2]>>,
    sdpa_workspace: Option<DevBuf>,
    /// cuDNN for bf16 attention (None: f32 ops, cuDNN missing or too old, or turned off).
    cudnn: Option<Cudnn>,
    /// What the ops chose instead of the fast path, once each (for the run's log).
    notes: Vec<String>,
    floats: Vec<DevBuf>,
    /// The storage type of each float buffer.
    dtypes: Vec<DType>,
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
    /// The group whose device all-reduces of this update's gradients are queued (NCCL on its
    /// own stream), until [`TrainOps::all_reduce_wait`] joins them.
    collectives: Option<Arc<Group>>,
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
    /// The ops on GPU `ordinal` in `precision`: fp32, tf32 (f32 buffers, products on TF32
    /// tensor cores), or bf16 (steps built on these ops keep bf16 activations,
    /// [`TrainOps::activation_dtype`]: products of bf16 operands with f32 sums; the products
    /// of f32 operands outside the blocks in tf32).
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self, DeviceError> {
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        ctx.bind_to_thread().map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = (major * 10 + minor) as u32;
        let name = ctx.name().unwrap_or_else(|_| "GPU".into());
        let stream = ctx.new_stream().map_err(drv)?;
        let lt = LtHandle::new().map_err(DeviceError::Other)?;
        let kernels = load_kernels(arch)?;
        let mut notes = Vec::new();
        let cudnn = match precision {
            Precision::Bf16 => match Cudnn::new(&stream) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.push(format!("bf16 attention on CUDA cores: {e}"));
                    None
                }
            },
            _ => None,
        };
        Ok(Self {
            gemms: HashMap::new(),
            sdpa: HashMap::new(),
            sdpa_workspace: None,
            cudnn,
            notes,
            floats: Vec::new(),
            dtypes: Vec::new(),
            indices: Vec::new(),
            workspace: DevBuf::new(WORKSPACE).map_err(drv)?,
            acc: DevBuf::new(8).map_err(drv)?,
            delta: None,
            kernels,
            lt,
            precision,
            name,
            batch: 0,
            collectives: None,
            stream,
            ctx,
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// These ops with bf16 attention on the CUDA-core kernels instead of cuDNN's fused
    /// attention (the other path of the GPU tests).
    pub fn without_cudnn(mut self) -> Self {
        self.sdpa.clear();
        self.cudnn = None;
        self
    }

    /// The key of cuDNN's plans for bf16 attention over `qkv` `[B·n, 3·h·hd]` and `out` in
    /// `self.sdpa`, built on first use; None where the CUDA-core kernels run it (f32, no
    /// cuDNN, or no engine for the layout).
    fn sdpa_plans(
        &mut self,
        qkv: T,
        out: T,
        [b, n, h, hd]: [usize; 4],
        scale: f32,
    ) -> Result<Option<([usize; 4], u32)>, DeviceError> {
        if self.dt(qkv) != DType::Bf16 || self.dt(out) != DType::Bf16 {
            return Ok(None);
        }
        let Some(cudnn) = &self.cudnn else {
            return Ok(None);
        };
        let key = ([b, n, h, hd], scale.to_bits());
        if !self.sdpa.contains_key(&key) {
            let layout = SdpaLayout {
                batch: b as i64,
                heads: h as i64,
                seq: n as i64,
                head_dim: hd as i64,
            };
            let built = SdpaTrain::new(cudnn, &layout, scale, SdpaPass::Forward).and_then(|f| {
                SdpaTrain::new(cudnn, &layout, scale, SdpaPass::Backward).map(|b| [f, b])
            });
            let plans = match built {
                Ok(p) => Some(p),
                Err(e) => {
                    self.notes
                        .push(format!("bf16 attention on CUDA cores for {layout}: {e}"));
                    None
                }
            };
            if let Some(p) = &plans {
                let need = p[0].workspace_bytes().max(p[1].workspace_bytes()).max(1);
                if self.sdpa_workspace.as_ref().is_none_or(|w| w.bytes < need) {
                    self.synchronize()?;
                    self.sdpa_workspace = Some(DevBuf::new(need).map_err(self.fail())?);
                }
            }
            self.sdpa.insert(key, plans);
        }
        Ok(self.sdpa[&key].as_ref().map(|_| key))
    }

    /// Run one of cuDNN's attention plans (`grads`: the backward's dO and dqkv).
    fn run_sdpa(
        &self,
        plan: &SdpaTrain,
        [qkv, out, lse]: [T; 3],
        grads: Option<(T, T)>,
    ) -> Result<(), DeviceError> {
        let (Some(cudnn), Some(ws)) = (&self.cudnn, &self.sdpa_workspace) else {
            return Err(DeviceError::Other("cuDNN attention without cuDNN".into()));
        };
        let grads = grads.map(|(d, dq)| (self.ptr(d), self.ptr(dq)));
        // SAFETY: the pointers address the layout's buffers (qkv, out, dout, dqkv of the
        // schedule's sizes, lse [B, h, n] f32); the workspace holds what the plans asked for;
        // all stay live until the stream is drained.
        unsafe {
            plan.execute(
                cudnn,
                self.ptr(qkv),
                self.ptr(out),
                self.ptr(lse),
                grads,
                ws.ptr,
            )
        }
        .map_err(|e| DeviceError::Other(e.to_string()))
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
        self.floats[t.buf].ptr + (self.dt(t).bytes() * t.off) as u64
    }

    fn dt(&self, t: T) -> DType {
        self.dtypes.get(t.buf).copied().unwrap_or_default()
    }

    /// An error unless every one of `ts` is f32 (the ops with no bf16 kernel).
    fn need_f32(&self, op: &str, ts: &[T]) -> Result<(), DeviceError> {
        match ts.iter().find(|t| self.dt(**t) != DType::F32) {
            None => Ok(()),
            Some(t) => Err(DeviceError::Other(format!(
                "the training engine's CUDA {op} takes f32 buffers, not bf16 buffer {}",
                t.buf
            ))),
        }
    }

    /// `f32` for f32 buffers, `bf16` for bf16 ones, an error when `ts` mix them.
    fn same_dtype(&self, op: &str, ts: &[T]) -> Result<DType, DeviceError> {
        let d = ts.first().map_or(DType::F32, |t| self.dt(*t));
        match ts.iter().all(|t| self.dt(*t) == d) {
            true => Ok(d),
            false => Err(DeviceError::Other(format!(
                "the training engine's CUDA {op} takes buffers of one type, not {:?}",
                ts.iter().map(|t| self.dt(*t)).collect::<Vec<_>>()
            ))),
        }
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

    fn activation_dtype(&self) -> DType {
        match self.precision {
            Precision::Bf16 => DType::Bf16,
            _ => DType::F32,
        }
    }

    /// cuDNN missing or too old for bf16 attention, or without an engine for a layout.
    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    fn prepare(&mut self, layout: &Layout) -> Result<(), DeviceError> {
        // The step may be built on another thread than the one that opened the GPU.
        self.ctx.bind_to_thread().map_err(self.fail())?;
        self.synchronize()?;
        // The descriptors hold bias pointers into the old buffers.
        self.gemms.clear();
        self.floats.clear();
        self.indices.clear();
        self.dtypes = (0..layout.floats.len()).map(|b| layout.dtype(b)).collect();
        for (b, (_, n)) in layout.floats.iter().enumerate() {
            let bytes = layout.dtype(b).bytes() * n;
            self.floats.push(DevBuf::new(bytes).map_err(self.fail())?);
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
        let values = &values[..t.len];
        let bf16: Vec<u16>;
        // SAFETY: the slice lies inside its buffer; the copy is complete when the stream is
        // synchronised below, before the values (or their bf16 copy) can go.
        let r = match self.dt(t) {
            DType::F32 => unsafe { result::memcpy_htod_async(self.ptr(t), values, self.st()) },
            DType::Bf16 => {
                bf16 = values
                    .iter()
                    .map(|&v| crate::kernels::bf16::to_bf16(v))
                    .collect();
                unsafe { result::memcpy_htod_async(self.ptr(t), &bf16[..], self.st()) }
            }
        };
        r.map_err(self.fail())?;
        self.synchronize()
    }

    fn upload_index(&mut self, i: I, values: &[u32]) -> Result<(), DeviceError> {
        // SAFETY: as `upload`.
        unsafe { result::memcpy_htod_async(self.iptr(i), &values[..i.len], self.st()) }
            .map_err(self.fail())?;
        self.synchronize()
    }

    /// GPU memory is scarcer than the three memory-bound passes per block that recomputing
    /// the LayerNorm and GELU outputs costs.
    fn recompute_activations(&self) -> bool {
        true
    }

    fn all_reduce_start(
        &mut self,
        t: T,
        group: &Arc<Group>,
    ) -> Result<Result<(), DistError>, DeviceError> {
        self.need_f32("all_reduce", &[t])?;
        if !group.device_collectives() {
            // Gloo (or an NCCL without ncclAvg): through host memory, at once.
            return all_reduce_on_host(self, t, group);
        }
        self.ctx.bind_to_thread().map_err(self.fail())?;
        let r = group.all_reduce_mean_device(self.ptr(t), t.len, &self.stream, "the gradients");
        self.collectives = Some(group.clone());
        Ok(r)
    }

    fn all_reduce_wait(&mut self) -> Result<Result<(), DistError>, DeviceError> {
        match self.collectives.take() {
            None => Ok(Ok(())),
            Some(g) => Ok(g.join_device(&self.stream)),
        }
    }

    fn read(&mut self, t: T) -> Result<Vec<f32>, DeviceError> {
        // Once per update: keeps this thread on the engine's context (burn's CUDA backend may
        // have made another current for validation).
        self.ctx.bind_to_thread().map_err(self.fail())?;
        self.synchronize()?;
        // SAFETY: the slice lies inside its buffer; the stream is idle.
        match self.dt(t) {
            DType::F32 => {
                let mut v = vec![0f32; t.len];
                unsafe { result::memcpy_dtoh_sync(&mut v, self.ptr(t)) }.map_err(self.fail())?;
                Ok(v)
            }
            DType::Bf16 => {
                let mut h = vec![0u16; t.len];
                unsafe { result::memcpy_dtoh_sync(&mut h, self.ptr(t)) }.map_err(self.fail())?;
                Ok(h.into_iter().map(crate::kernels::bf16::from_bf16).collect())
            }
        }
    }

    fn fill(&mut self, t: T, value: f32) -> Result<(), DeviceError> {
        let (x, n) = (self.ptr(t), t.len as i64);
        let mut a = args![x, n, value];
        let f = match self.dt(t) {
            DType::F32 => self.kernels.fill,
            DType::Bf16 => self.kernels.fill_bf16,
        };
        self.elementwise(f, t.len, &mut a)
    }

    fn copy(&mut self, src: T, dst: T) -> Result<(), DeviceError> {
        let (s, d, n) = (self.ptr(src), self.ptr(dst), src.len as i64);
        let convert = match (self.dt(src), self.dt(dst)) {
            (DType::F32, DType::Bf16) => self.kernels.convert[0],
            (DType::Bf16, DType::F32) => self.kernels.convert[1],
            (t, _) => {
                let bytes = t.bytes() * src.len;
                // SAFETY: both slices lie inside their buffers and do not overlap (the
                // schedule's copies are between distinct tensors).
                return unsafe { result::memcpy_dtod_async(d, s, bytes, self.st()) }
                    .map_err(self.fail());
            }
        };
        let mut a = args![s, d, n];
        self.elementwise(convert, src.len, &mut a)
    }

    fn patchify(
        &mut self,
        clips: T,
        dims: [usize; 5],
        tubelet: usize,
        patch: usize,
        out: T,
    ) -> Result<(), DeviceError> {
        self.need_f32("patchify", &[clips, out])?;
        let (src, dst) = (self.ptr(clips), self.ptr(out));
        let [b, c, t, h, w] = dims.map(|v| v as i32);
        let (tu, pa) = (tubelet as i32, patch as i32);
        let mut a = args![src, dst, b, c, t, h, w, tu, pa];
        self.elementwise(self.kernels.patchify, out.len, &mut a)
    }

    fn gather(&mut self, g: &Gather) -> Result<(), DeviceError> {
        self.need_f32("gather", &[g.src.t, g.dst.t])?;
        self.launch_gather(self.kernels.gather, g)
    }

    fn scatter_add(&mut self, g: &Gather) -> Result<(), DeviceError> {
        self.need_f32("scatter_add", &[g.src.t, g.dst.t])?;
        self.launch_gather(self.kernels.scatter_add, g)
    }

    fn gemm(&mut self, g: &Gemm) -> Result<(), DeviceError> {
        if !self.gemms.contains_key(g) {
            // Operands of one type; the bias (cuBLASLt's default) of D's.
            self.same_dtype("product's operands", &[g.a, g.b])?;
            if let Some(b) = g.bias {
                self.same_dtype("product's bias and output", &[b, g.d])?;
            }
            let types = [self.dt(g.a), self.dt(g.d)];
            let desc = lt::describe_train(g, self.precision, types);
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
        self.need_f32("col_sum's output", &[dst])?;
        let rows = (src.len / width.max(1)) as i64;
        let (s, d) = (self.ptr(src), self.ptr(dst));
        let (w, c0, cols) = (width as i32, col0 as i32, dst.len as i32);
        let mut a = args![s, rows, w, c0, cols, d];
        let splits = rows.clamp(1, 128) as u32;
        let grid = (dst.len.div_ceil(256).max(1) as u32, splits, 1);
        let f = match self.dt(src) {
            DType::F32 => self.kernels.col_sum,
            DType::Bf16 => self.kernels.col_sum_bf16,
        };
        self.launch(f, grid, 256, 0, &mut a)
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
        self.need_f32("layer_norm", &[x, gamma, beta, stats])?;
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
        let f = match self.dt(out) {
            DType::F32 => self.kernels.ln_fwd,
            DType::Bf16 => self.kernels.ln_fwd_bf16,
        };
        self.launch(f, grid, 256, 0, &mut a)
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
        self.need_f32(
            "layer_norm_backward",
            &[x, stats, gamma, dout, dx, dgamma, dbeta],
        )?;
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
        self.need_f32("attention's log-sum-exps", &[lse])?;
        if let Some(key) = self.sdpa_plans(qkv, out, [b, n, h, hd], scale)? {
            if let Some([fwd, _]) = &self.sdpa[&key] {
                return self.run_sdpa(fwd, [qkv, out, lse], None);
            }
        }
        let w = Self::attention_width(hd)?;
        let kernels = match self.same_dtype("attention", &[qkv, out])? {
            DType::F32 => &self.kernels.attention,
            DType::Bf16 => &self.kernels.attention_bf16,
        };
        let (q, o, l) = (self.ptr(qkv), self.ptr(out), self.ptr(lse));
        let (ni, hi, hdi) = (n as i32, h as i32, hd as i32);
        let mut a = args![q, o, l, ni, hi, hdi, scale];
        let grid = (
            n.div_ceil(128).max(1) as u32,
            Self::attention_rows(b, h)?,
            1,
        );
        self.launch(kernels[w][0], grid, 128, 0, &mut a)
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
        self.need_f32("attention's log-sum-exps", &[lse])?;
        self.same_dtype("attention's backward", &[qkv, out, dout, dqkv])?;
        if let Some(key) = self.sdpa_plans(qkv, out, [b, n, h, hd], scale)? {
            if let Some([_, bwd]) = &self.sdpa[&key] {
                return self.run_sdpa(bwd, [qkv, out, lse], Some((dout, dqkv)));
            }
        }
        let w = Self::attention_width(hd)?;
        let (kernels, delta_kernel) =
            match self.same_dtype("attention's backward", &[qkv, out, dout, dqkv])? {
                DType::F32 => (self.kernels.attention, self.kernels.delta),
                DType::Bf16 => (self.kernels.attention_bf16, self.kernels.delta_bf16),
            };
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
        self.elementwise(delta_kernel, b * n * h, &mut a)?;
        let grid = (n.div_ceil(64).max(1) as u32, Self::attention_rows(b, h)?, 1);
        for k in [1, 2] {
            let mut a = args![q, g, l, delta, dq, ni, hi, hdi, scale];
            self.launch(kernels[w][k], grid, 64, 0, &mut a)?;
        }
        Ok(())
    }

    fn gelu(&mut self, x: T, out: T) -> Result<(), DeviceError> {
        let f = match self.same_dtype("gelu", &[x, out])? {
            DType::F32 => self.kernels.gelu_fwd,
            DType::Bf16 => self.kernels.gelu_fwd_bf16,
        };
        let (xp, yp, n) = (self.ptr(x), self.ptr(out), x.len as i64);
        let mut a = args![xp, yp, n];
        self.elementwise(f, x.len, &mut a)
    }

    fn gelu_backward(&mut self, x: T, grad: T) -> Result<(), DeviceError> {
        let f = match self.same_dtype("gelu_backward", &[x, grad])? {
            DType::F32 => self.kernels.gelu_bwd,
            DType::Bf16 => self.kernels.gelu_bwd_bf16,
        };
        let (xp, gp, n) = (self.ptr(x), self.ptr(grad), x.len as i64);
        let mut a = args![xp, gp, n];
        self.elementwise(f, x.len, &mut a)
    }

    fn leaky_relu(&mut self, x: T, slope: f32, out: T) -> Result<(), DeviceError> {
        self.need_f32("leaky_relu", &[x, out])?;
        let (xp, yp, n) = (self.ptr(x), self.ptr(out), x.len as i64);
        let mut a = args![xp, yp, n, slope];
        self.elementwise(self.kernels.leaky, x.len, &mut a)
    }

    fn leaky_relu_backward(&mut self, x: T, slope: f32, grad: T) -> Result<(), DeviceError> {
        self.need_f32("leaky_relu_backward", &[x, grad])?;
        let (xp, gp, n) = (self.ptr(x), self.ptr(grad), x.len as i64);
        let mut a = args![xp, gp, n, slope];
        self.elementwise(self.kernels.leaky_bwd, x.len, &mut a)
    }

    fn mse(&mut self, pred: T, target: T, dpred: Option<T>, loss: T) -> Result<(), DeviceError> {
        self.need_f32("mse", &[pred, target, dpred.unwrap_or(loss), loss])?;
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
        self.need_f32("mean", &[x, loss])?;
        let (xp, n) = (self.ptr(x), x.len as i64);
        self.reduce_into(loss, 1.0 / x.len.max(1) as f64, |acc| {
            let mut a = args![xp, n, acc];
            self.elementwise(self.kernels.sum, x.len, &mut a)
        })
    }

    fn adamw(&mut self, p: T, g: T, m: T, v: T, h: &AdamW) -> Result<(), DeviceError> {
        self.need_f32("adamw", &[p, g, m, v])?;
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
