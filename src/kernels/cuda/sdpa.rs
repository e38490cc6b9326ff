//! Fused flash attention forward (scaled dot-product attention, SDPA) through cuDNN's backend
//! graph API: `softmax(scale * Q Kᵀ) V` per (clip, head) in one cuDNN engine, without the
//! [seq, seq] score matrix ever reaching memory.
//!
//! # Which cuDNN
//!
//! The graph is cuDNN's *unified* SDPA forward operation
//! (`CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR`), which cuDNN 9.13.1 introduced
//! ([`MIN_CUDNN_VERSION`]; cudnn-frontend's `UnifiedSDPANode` gates on the same number and
//! picks this operation first whenever the backend has it). libcudnn (`libcudnn.so.9`) is
//! opened at run time through cudarc's loader: without it, or with an older one, every
//! constructor returns an [`SdpaError`] that says what to install; nothing panics.
//!
//! # Layout
//!
//! Q, K and V are read in place from the bf16 qkv buffer the QKV projection wrote, row-major
//! [batch, seq, 3, heads, head_dim] (one row of 3·D per token, D = heads·head_dim): Q is the
//! view [batch, heads, seq, head_dim] with strides [seq·3D, head_dim, 3D, 1] at the buffer's
//! start, K and V the same view D and 2D elements further ([`SdpaLayout::qkv_pointers`]). O is
//! bf16 [batch, heads, seq, head_dim] with strides [seq·D, head_dim, D, 1]: the row-major
//! [batch·seq, D] matrix the output projection reads. The scale (usually 1/√head_dim) is an
//! f32 by-value scalar baked into the plan. Products accumulate in f32 inside the engine.
//!
//! # Use
//!
//! One [`Cudnn`] per stream. One [`SdpaFwd`] per layout (per batch size), built once (the
//! build runs cuDNN's heuristics and may compile kernels: milliseconds to a second), then
//! [`SdpaFwd::execute`]d any number of times on that handle's stream with a device workspace
//! of at least [`SdpaFwd::workspace_bytes`]. Under CUDA graph capture, execute once outside
//! the capture first: cuDNN loads its kernels on the first execution (cudnn-frontend's
//! `Graph::warmup` does the same), which a capture in global mode does not allow.

use std::fmt;

/// The oldest cuDNN with the unified SDPA forward operation: 9.13.1, as cuDNN numbers its
/// versions (major·10000 + minor·100 + patch).
pub const MIN_CUDNN_VERSION: usize = 91301;

/// Tensor uid of Q in the graph and in the variant pack.
pub const UID_Q: i64 = 1;
/// Tensor uid of K.
pub const UID_K: i64 = 2;
/// Tensor uid of V.
pub const UID_V: i64 = 3;
/// Tensor uid of O.
pub const UID_O: i64 = 4;
/// Tensor uid of the attention scale (by value).
pub const UID_SCALE: i64 = 5;
/// Tensor uids of the training graphs: the forward's statistics (the rows' log-sum-exps, f32),
/// the output's gradient, and the gradients of Q, K and V.
pub const UID_STATS: i64 = 6;
pub const UID_DO: i64 = 7;
pub const UID_DQ: i64 = 8;
pub const UID_DK: i64 = 9;
pub const UID_DV: i64 = 10;

/// The oldest cuDNN with the unified SDPA backward operation (`SDPA_BWD`): 9.17.0.
pub const MIN_CUDNN_BWD_VERSION: usize = 91700;

/// Byte alignment every device pointer must have (and the graph's tensors declare): 16, the
/// alignment of cudnn-frontend's tensors and of the engines' vector loads.
pub const ALIGNMENT: u64 = 16;

/// Layout of one attention call over a fused qkv buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpaLayout {
    /// Clips in the batch.
    pub batch: i64,
    /// Attention heads.
    pub heads: i64,
    /// Tokens per clip (1568 for the released models, 64 for tests).
    pub seq: i64,
    /// Width of one head (64 for the released models).
    pub head_dim: i64,
}

impl SdpaLayout {
    /// D = heads·head_dim: the model width, one third of a qkv row.
    pub fn d_model(&self) -> i64 {
        self.heads * self.head_dim
    }

    /// Elements of the qkv buffer [batch, seq, 3, heads, head_dim].
    pub fn qkv_len(&self) -> i64 {
        self.batch * self.seq * 3 * self.d_model()
    }

    /// Elements of the output [batch, seq, heads, head_dim].
    pub fn out_len(&self) -> i64 {
        self.batch * self.seq * self.d_model()
    }

    /// Device addresses of Q, K and V inside the bf16 qkv buffer at `qkv`: the buffer itself,
    /// then D and 2D elements (2 bytes each) further.
    pub fn qkv_pointers(&self, qkv: u64) -> [u64; 3] {
        let part = 2 * self.d_model() as u64;
        [qkv, qkv + part, qkv + 2 * part]
    }

    /// Checks what this module needs of a layout: every size positive, head_dim a multiple of
    /// 8 (so K, V and every row start on a 16-byte boundary), and element counts that fit i64.
    pub fn validate(&self) -> Result<(), SdpaError> {
        let SdpaLayout {
            batch,
            heads,
            seq,
            head_dim,
        } = *self;
        if batch <= 0 || heads <= 0 || seq <= 0 || head_dim <= 0 {
            return Err(SdpaError::Invalid(format!(
                "every size of {self:?} must be positive"
            )));
        }
        if head_dim % 8 != 0 {
            return Err(SdpaError::Invalid(format!(
                "head_dim {head_dim} is not a multiple of 8 (bf16 rows and the K and V views \
                 must start on 16-byte boundaries)"
            )));
        }
        let len = [heads, head_dim, 3, seq, batch, 2]
            .iter()
            .try_fold(1i64, |acc, &x| acc.checked_mul(x));
        if len.is_none() {
            return Err(SdpaError::Invalid(format!(
                "{self:?} has more bytes than an i64 counts"
            )));
        }
        Ok(())
    }
}

/// Which tensor of the graph a [`TensorSpec`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Q,
    K,
    V,
    O,
    Scale,
    Stats,
    DO,
    DQ,
    DK,
    DV,
}

impl TensorRole {
    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            TensorRole::Q => "tensor Q",
            TensorRole::K => "tensor K",
            TensorRole::V => "tensor V",
            TensorRole::O => "tensor O",
            TensorRole::Scale => "tensor scale",
            TensorRole::Stats => "tensor stats",
            TensorRole::DO => "tensor dO",
            TensorRole::DQ => "tensor dQ",
            TensorRole::DK => "tensor dK",
            TensorRole::DV => "tensor dV",
        }
    }
}

/// Element type of a graph tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpaDtype {
    Bf16,
    F32,
}

/// One tensor of the graph: uid, dims, strides (elements), and whether it is virtual / by value.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Unique id (the variant pack binds pointers by it): one of the `UID_*` constants.
    pub uid: i64,
    /// Which operand it is.
    pub role: TensorRole,
    /// Element type.
    pub dtype: SdpaDtype,
    /// Sizes, outermost first ([batch, heads, seq, head_dim] for Q, K, V and O).
    pub dims: Vec<i64>,
    /// Strides in elements, one per dim.
    pub strides: Vec<i64>,
    /// Passed as a host value at execution instead of a device pointer (the scale).
    pub by_value: bool,
    /// An intermediate with no memory (none in this graph: the unified operation keeps its
    /// scores and softmax inside the engine).
    pub is_virtual: bool,
}

/// Pure: the graph's tensors, in the order Q, K, V, O, scale. Q, K, V are read in place from a
/// bf16 qkv buffer laid out row-major [batch, seq, 3, heads, head_dim] (one row of 3·D per
/// token, D = heads·head_dim): Q dims [batch, heads, seq, head_dim] with strides
/// [seq·3D, head_dim, 3D, 1]; K and V the same strides (their base pointers are the qkv pointer
/// plus D and 2D elements; the caller passes the three pointers). O is bf16
/// [batch, heads, seq, head_dim] with strides [seq·D, head_dim, D, 1], i.e. the row-major
/// [batch·seq, D] layout the next GEMM reads. Scale: an f32 by-value scalar [1, 1, 1, 1].
pub fn sdpa_tensors(l: &SdpaLayout) -> Vec<TensorSpec> {
    let d = l.d_model();
    let dims = vec![l.batch, l.heads, l.seq, l.head_dim];
    let qkv_strides = vec![l.seq * 3 * d, l.head_dim, 3 * d, 1];
    let io = |uid, role, strides: &Vec<i64>| TensorSpec {
        uid,
        role,
        dtype: SdpaDtype::Bf16,
        dims: dims.clone(),
        strides: strides.clone(),
        by_value: false,
        is_virtual: false,
    };
    vec![
        io(UID_Q, TensorRole::Q, &qkv_strides),
        io(UID_K, TensorRole::K, &qkv_strides),
        io(UID_V, TensorRole::V, &qkv_strides),
        io(UID_O, TensorRole::O, &vec![l.seq * d, l.head_dim, d, 1]),
        TensorSpec {
            uid: UID_SCALE,
            role: TensorRole::Scale,
            dtype: SdpaDtype::F32,
            dims: vec![1, 1, 1, 1],
            strides: vec![1, 1, 1, 1],
            by_value: true,
            is_virtual: false,
        },
    ]
}

/// Pure: the training graphs' tensors: those of [`sdpa_tensors`], then the statistics (f32
/// [batch, heads, seq, 1], strides [heads·seq, seq, 1, 1]: the row-major [batch, heads, seq]
/// log-sum-exps the engine keeps), dO (O's layout), and dQ, dK, dV (Q's strides, in a bf16
/// dqkv buffer laid out as qkv).
pub fn sdpa_train_tensors(l: &SdpaLayout) -> Vec<TensorSpec> {
    let mut v = sdpa_tensors(l);
    let (o, q) = (v[3].clone(), v[0].clone());
    v.push(TensorSpec {
        uid: UID_STATS,
        role: TensorRole::Stats,
        dtype: SdpaDtype::F32,
        dims: vec![l.batch, l.heads, l.seq, 1],
        strides: vec![l.heads * l.seq, l.seq, 1, 1],
        by_value: false,
        is_virtual: false,
    });
    v.push(TensorSpec {
        uid: UID_DO,
        role: TensorRole::DO,
        ..o
    });
    for (uid, role) in [
        (UID_DQ, TensorRole::DQ),
        (UID_DK, TensorRole::DK),
        (UID_DV, TensorRole::DV),
    ] {
        v.push(TensorSpec {
            uid,
            role,
            ..q.clone()
        });
    }
    v
}

/// Why cuDNN attention cannot be used or failed. Every message is one line that says what to
/// install or do.
#[derive(Debug, thiserror::Error)]
pub enum SdpaError {
    /// libcudnn cannot be opened.
    #[error(
        "cuDNN was not found: install cuDNN 9.13.1 or newer (libcudnn.so.9: the distribution's \
         libcudnn9 package or `pip install nvidia-cudnn-cu12`) and put its library folder on \
         LD_LIBRARY_PATH"
    )]
    Missing,
    /// The library that opened lacks a function this module calls.
    #[error(
        "the libcudnn that was loaded has no `{symbol}`: install cuDNN 9.13.1 or newer and put \
         it first on LD_LIBRARY_PATH"
    )]
    MissingSymbol { symbol: &'static str },
    /// The loaded cuDNN predates the unified SDPA operation.
    #[error(
        "cuDNN {} has no fused attention operation (it needs {} or newer): upgrade cuDNN \
         (libcudnn.so.9) or run attention without cuDNN",
        version_string(.found),
        version_string(.needed)
    )]
    TooOld { found: usize, needed: usize },
    /// cuDNN has no engine for this GPU, layout and version.
    #[error(
        "cuDNN has no fused attention engine for this GPU and layout ({0}): upgrade cuDNN, or \
         run attention without cuDNN"
    )]
    Unsupported(String),
    /// The caller passed something this module rejects (layout, scale, pointers).
    #[error("invalid cuDNN attention call: {0}")]
    Invalid(String),
    /// A cuDNN call failed.
    #[error(
        "{call} failed: {status}; rerun with CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr for \
         cuDNN's reason"
    )]
    Cudnn { call: &'static str, status: String },
    /// Binding the stream's CUDA context to this thread failed.
    #[error("CUDA driver error before a cuDNN call: {0}; check the GPU with nvidia-smi")]
    Driver(String),
}

/// cuDNN's version number as text: 91301 is 9.13.1 (cuDNN 9 counts major·10000 + minor·100 +
/// patch, cuDNN 8 major·1000 + minor·100 + patch).
fn version_string(v: &usize) -> String {
    let v = *v;
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
    }
}

impl fmt::Display for SdpaLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {}, heads {}, seq {}, head_dim {}",
            self.batch, self.heads, self.seq, self.head_dim
        )
    }
}

/// The loaded cuDNN's version number (e.g. 91301 for 9.13.1), or None when libcudnn cannot be
/// opened (or is not a cuDNN: it has no `cudnnGetVersion`).
#[cfg(feature = "cuda-engine")]
pub fn cudnn_version() -> Option<usize> {
    match backend::probe() {
        backend::Probe::Found { version, .. } => Some(version),
        backend::Probe::NotFound | backend::Probe::NoVersion => None,
    }
}

/// A cuDNN handle on one stream (created with cudarc, its stream set; Drop destroys it).
///
/// `Send` but not `Sync`: cuDNN allows a handle on any thread, but never on two at once.
#[cfg(feature = "cuda-engine")]
pub struct Cudnn {
    handle: cudarc::cudnn::sys::cudnnHandle_t,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

// SAFETY: a cuDNN handle is not tied to the thread that created it: cuDNN's thread-safety rule
// is only that one handle is not used by two threads at the same time, which `!Sync` and the
// `&self` of every use guarantee. Each use binds the stream's CUDA context to the calling
// thread first.
#[cfg(feature = "cuda-engine")]
unsafe impl Send for Cudnn {}

#[cfg(feature = "cuda-engine")]
impl Cudnn {
    /// A handle whose work goes to `stream`. Fails with [`SdpaError::Missing`],
    /// [`SdpaError::TooOld`] or [`SdpaError::MissingSymbol`] where the loaded cuDNN cannot run
    /// this module's graph.
    pub fn new(stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Self, SdpaError> {
        use cudarc::cudnn::{result, sys};
        backend::require()?;
        bind(stream)?;
        let handle = result::create_handle()
            .map_err(|e| backend::cudnn_error(e.0, "cudnnCreate", format_args!("a handle")))?;
        let this = Cudnn {
            handle,
            stream: stream.clone(),
        };
        // SAFETY: `handle` was just created and is owned by `this`; the stream is alive for as
        // long as `this` holds its Arc.
        unsafe { result::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }.map_err(
            |e| backend::cudnn_error(e.0, "cudnnSetStream", format_args!("the engine's stream")),
        )?;
        Ok(this)
    }

    /// The stream this handle's work goes to.
    pub fn stream(&self) -> &std::sync::Arc<cudarc::driver::CudaStream> {
        &self.stream
    }
}

#[cfg(feature = "cuda-engine")]
impl Drop for Cudnn {
    fn drop(&mut self) {
        // cudnnDestroy wants the handle's context current; an error here has nowhere to go
        // (the handle is gone either way).
        let _ = bind(&self.stream);
        // SAFETY: the handle was created by cudnnCreate, is owned by `self` and destroyed once.
        let _ = unsafe { cudarc::cudnn::sys::cudnnDestroy(self.handle) };
    }
}

#[cfg(feature = "cuda-engine")]
fn bind(stream: &cudarc::driver::CudaStream) -> Result<(), SdpaError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| SdpaError::Driver(e.to_string()))
}

/// A finalised execution plan for one layout (built once per batch size, then executed many
/// times, also inside CUDA graph capture).
///
/// Drop it before the [`Cudnn`] it was built with and before the CUDA context, on a thread
/// where that context can be current (the engine's): the plan refers to the handle and may
/// hold kernels cuDNN loaded into the context.
#[cfg(feature = "cuda-engine")]
pub struct SdpaFwd {
    // Fields drop in declaration order: the plan before the engine config and graph it was
    // built from, the operation before its tensors.
    plan: backend::Desc,
    _config: backend::Desc,
    _graph: backend::Desc,
    _op: backend::Desc,
    _tensors: Vec<backend::Desc>,
    layout: SdpaLayout,
    /// The by-value scale; the variant pack points at it during each execute.
    scale: f32,
    workspace: usize,
}

// SAFETY: the descriptors are cuDNN heap objects owned by this value alone (nothing else holds
// their pointers) and not tied to a thread; moving the owner to another thread moves them
// whole. Execution goes through the caller's `&Cudnn`, which cannot be on two threads at once.
#[cfg(feature = "cuda-engine")]
unsafe impl Send for SdpaFwd {}

#[cfg(feature = "cuda-engine")]
impl SdpaFwd {
    /// Builds the plan: the tensors of [`sdpa_tensors`], the unified SDPA operation, the
    /// operation graph, then the engine configs of heuristics mode A (then the fallback mode)
    /// in their ranked order until one finalises into an execution plan.
    pub fn new(cudnn: &Cudnn, l: &SdpaLayout, scale: f32) -> Result<Self, SdpaError> {
        use backend::{Attr, Desc, Kind};

        backend::require()?;
        l.validate()?;
        if !scale.is_finite() {
            return Err(SdpaError::Invalid(format!(
                "the attention scale {scale} is not finite"
            )));
        }
        bind(&cudnn.stream)?;

        let specs = sdpa_tensors(l);
        let tensors = specs
            .iter()
            .map(backend::tensor)
            .collect::<Result<Vec<_>, _>>()?;
        let of = |role: TensorRole| {
            let i = specs.iter().position(|s| s.role == role);
            // `sdpa_tensors` returns one tensor of every role (a unit test checks it).
            &tensors[i.expect("sdpa_tensors has every role")]
        };

        // UnifiedSDPANode::create_cudnn_operations: Q, K, V, O, the scale; no stats (inference).
        let op = Desc::new(
            Kind::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR,
            "SDPA operation",
        )?;
        for (attr, role) in [
            (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, TensorRole::Q),
            (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, TensorRole::K),
            (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, TensorRole::V),
            (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, TensorRole::O),
            (
                Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC,
                TensorRole::Scale,
            ),
        ] {
            op.set_descs(attr, &[of(role)])?;
        }
        op.finalize()?;
        let p = plan_graph(cudnn, &op, format!("{l}"))?;
        Ok(SdpaFwd {
            plan: p.plan,
            _config: p.config,
            _graph: p.graph,
            _op: op,
            _tensors: tensors,
            layout: *l,
            scale,
            workspace: p.workspace,
        })
    }

    /// Bytes of device workspace [`execute`](Self::execute) needs (0 is possible).
    pub fn workspace_bytes(&self) -> usize {
        self.workspace
    }

    /// The layout the plan was built for.
    pub fn layout(&self) -> SdpaLayout {
        self.layout
    }

    /// Enqueues the attention on `cudnn`'s stream: O = softmax(scale · Q Kᵀ) V for every clip
    /// and head. `q`, `k`, `v` are the three addresses of [`SdpaLayout::qkv_pointers`], `o` the
    /// output [batch·seq, D], `workspace` at least [`workspace_bytes`](Self::workspace_bytes)
    /// bytes (any value, 0 included, when that is 0). Host-side only: no synchronisation, and
    /// capturable once the plan has executed outside a capture.
    ///
    /// # Safety
    /// Pointers are device pointers to buffers of the layout's sizes, valid until the stream's
    /// work completes; `o` and `workspace` overlap nothing else in flight. `cudnn` is the handle
    /// the plan was built with (or one on the same device).
    pub unsafe fn execute(
        &self,
        cudnn: &Cudnn,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        workspace: u64,
    ) -> Result<(), SdpaError> {
        let named = [("q", q), ("k", k), ("v", v), ("o", o)];
        let uids = [UID_Q, UID_K, UID_V, UID_O, UID_SCALE];
        // SAFETY: the caller's pointers, per this function's contract.
        unsafe {
            run_plan(
                cudnn,
                &self.plan,
                &named,
                &uids,
                &self.scale,
                (workspace, self.workspace),
                format_args!("the SDPA plan for {}", self.layout),
            )
        }
    }
}

/// An execution plan of one finalised operation, with what it was built from (drop the plan
/// first: fields drop in this order).
#[cfg(feature = "cuda-engine")]
struct Planned {
    plan: backend::Desc,
    config: backend::Desc,
    graph: backend::Desc,
    workspace: usize,
}

/// The operation graph of `op`, then the engine configs of heuristics mode A (then the
/// fallback mode) in their ranked order until one finalises into an execution plan; `what`
/// names the layout in the error when none does.
#[cfg(feature = "cuda-engine")]
fn plan_graph(cudnn: &Cudnn, op: &backend::Desc, what: String) -> Result<Planned, SdpaError> {
    use backend::{Attr, Desc, Kind};
    use cudarc::cudnn::sys::cudnnBackendHeurMode_t as Mode;

    let graph = Desc::new(
        Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR,
        "operation graph",
    )?;
    graph.set_descs(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &[op])?;
    graph.set_handle(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, cudnn.handle)?;
    graph.finalize()?;

    let mut failures = Vec::new();
    for mode in [Mode::CUDNN_HEUR_MODE_A, Mode::CUDNN_HEUR_MODE_FALLBACK] {
        let configs = match backend::heuristics(&graph, mode) {
            Ok(configs) => configs,
            // A mode that fails is one that offers nothing; the next mode may still.
            Err(SdpaError::Unsupported(why)) | Err(SdpaError::Cudnn { status: why, .. }) => {
                failures.push(format!("{mode:?}: {why}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        if configs.is_empty() {
            failures.push(format!("{mode:?}: no engine config"));
        }
        for (rank, config) in configs.into_iter().enumerate() {
            match backend::plan(&config, cudnn.handle) {
                Ok(plan) => {
                    let bytes = plan.get_i64(Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
                    let workspace = usize::try_from(bytes).map_err(|_| SdpaError::Cudnn {
                        call: "cudnnBackendGetAttribute",
                        status: format!("a workspace size of {bytes} bytes"),
                    })?;
                    return Ok(Planned {
                        plan,
                        config,
                        graph,
                        workspace,
                    });
                }
                // Any config may fail to finalise (cudnn-frontend's check_support moves on to
                // the next one as well); the reasons go into the error if none does.
                Err(SdpaError::Unsupported(why)) | Err(SdpaError::Cudnn { status: why, .. }) => {
                    failures.push(format!("{mode:?} config {rank}: {why}"))
                }
                Err(e) => return Err(e),
            }
        }
    }
    let version = cudnn_version().map_or_else(|| "?".into(), |v| version_string(&v));
    Err(SdpaError::Unsupported(format!(
        "{what}, cuDNN {version}; {}",
        failures.join("; ")
    )))
}

/// Check the device pointers `named` (null or misaligned is an error) and the workspace, then
/// execute `plan` on `cudnn`'s stream with the pointers bound to `uids` (one more uid at the
/// end: the by-value `scale`).
///
/// # Safety
/// As the plans' `execute`: device pointers of the plan's layout, valid until the stream's
/// work completes; `plan` built with `cudnn`.
#[cfg(feature = "cuda-engine")]
unsafe fn run_plan(
    cudnn: &Cudnn,
    plan: &backend::Desc,
    named: &[(&str, u64)],
    uids: &[i64],
    scale: &f32,
    (workspace, needed): (u64, usize),
    what: fmt::Arguments<'_>,
) -> Result<(), SdpaError> {
    use backend::{Attr, Desc, Kind};
    use std::ffi::c_void;

    for (name, p) in named {
        if *p == 0 || p % ALIGNMENT != 0 {
            return Err(SdpaError::Invalid(format!(
                "pointer {name} = {p:#x} is null or not {ALIGNMENT}-byte aligned"
            )));
        }
    }
    if needed > 0 && workspace == 0 {
        return Err(SdpaError::Invalid(format!(
            "the plan needs {needed} bytes of workspace and got a null pointer"
        )));
    }
    bind(&cudnn.stream)?;
    let device = |p: u64| std::ptr::with_exposed_provenance_mut::<c_void>(p as usize);
    let mut pointers: Vec<*mut c_void> = named.iter().map(|(_, p)| device(*p)).collect();
    // cuDNN reads by-value tensors through host pointers during this call.
    pointers.push(std::ptr::from_ref(scale).cast_mut().cast::<c_void>());
    let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "variant pack")?;
    pack.set_pointers(Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, &pointers)?;
    pack.set_i64s(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, uids)?;
    pack.set_pointers(
        Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
        &[device(workspace)],
    )?;
    pack.finalize()?;
    // SAFETY: the handle, the plan and the variant pack are live, finalised descriptors; the
    // pack's device pointers are the caller's (valid per this function's contract), its host
    // pointer (the scale) outlives the call.
    let status =
        unsafe { cudarc::cudnn::sys::cudnnBackendExecute(cudnn.handle, plan.raw(), pack.raw()) };
    backend::check(status, "cudnnBackendExecute", what)
}

/// Which training graph a [`SdpaTrain`] plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpaPass {
    /// O and the statistics (the rows' log-sum-exps) from Q, K, V.
    Forward,
    /// dQ, dK, dV from Q, K, V, O, dO and the statistics.
    Backward,
}

/// A finalised training plan for one layout: the unified SDPA forward with its statistics, or
/// the unified SDPA backward (cuDNN >= 9.17.0), over bf16 qkv/dqkv buffers and f32 statistics.
#[cfg(feature = "cuda-engine")]
pub struct SdpaTrain {
    plan: backend::Desc,
    _config: backend::Desc,
    _graph: backend::Desc,
    _op: backend::Desc,
    _tensors: Vec<backend::Desc>,
    layout: SdpaLayout,
    pass: SdpaPass,
    scale: f32,
    workspace: usize,
}

// SAFETY: as SdpaFwd's: descriptors owned by this value alone, executed through `&Cudnn`.
#[cfg(feature = "cuda-engine")]
unsafe impl Send for SdpaTrain {}

#[cfg(feature = "cuda-engine")]
impl SdpaTrain {
    /// Builds the plan of `pass` for layout `l` (see [`SdpaFwd::new`]: heuristics mode A,
    /// then the fallback mode, the first config that finalises). The backward needs cuDNN
    /// 9.17.0 or newer ([`SdpaError::TooOld`] otherwise).
    pub fn new(
        cudnn: &Cudnn,
        l: &SdpaLayout,
        scale: f32,
        pass: SdpaPass,
    ) -> Result<Self, SdpaError> {
        use backend::{Attr, Desc, Kind};

        backend::require()?;
        if pass == SdpaPass::Backward {
            let found = cudnn_version().unwrap_or(0);
            if found < MIN_CUDNN_BWD_VERSION {
                return Err(SdpaError::TooOld {
                    found,
                    needed: MIN_CUDNN_BWD_VERSION,
                });
            }
        }
        l.validate()?;
        if !scale.is_finite() {
            return Err(SdpaError::Invalid(format!(
                "the attention scale {scale} is not finite"
            )));
        }
        bind(&cudnn.stream)?;
        let specs = sdpa_train_tensors(l);
        let tensors = specs
            .iter()
            .map(backend::tensor)
            .collect::<Result<Vec<_>, _>>()?;
        let of = |role: TensorRole| {
            let i = specs.iter().position(|s| s.role == role);
            // `sdpa_train_tensors` returns one tensor of every role (a unit test checks it).
            &tensors[i.expect("sdpa_train_tensors has every role")]
        };
        let (kind, attrs) = match pass {
            SdpaPass::Forward => (
                Kind::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR,
                vec![
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, TensorRole::Q),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, TensorRole::K),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, TensorRole::V),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, TensorRole::O),
                    (
                        Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_STATSDESC,
                        TensorRole::Stats,
                    ),
                    (
                        Attr::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC,
                        TensorRole::Scale,
                    ),
                ],
            ),
            SdpaPass::Backward => (
                Kind::CUDNN_BACKEND_OPERATION_SDPA_BWD_DESCRIPTOR,
                vec![
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_QDESC, TensorRole::Q),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_KDESC, TensorRole::K),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_VDESC, TensorRole::V),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_ODESC, TensorRole::O),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_DODDESC, TensorRole::DO),
                    (
                        Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_STATSDESC,
                        TensorRole::Stats,
                    ),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_DQDESC, TensorRole::DQ),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_DKDESC, TensorRole::DK),
                    (Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_DVDESC, TensorRole::DV),
                    (
                        Attr::CUDNN_ATTR_OPERATION_SDPA_BWD_SCALEDESC,
                        TensorRole::Scale,
                    ),
                ],
            ),
        };
        let op = Desc::new(kind, "SDPA training operation")?;
        for (attr, role) in attrs {
            op.set_descs(attr, &[of(role)])?;
        }
        op.finalize()?;
        let p = plan_graph(cudnn, &op, format!("{pass:?} of {l}"))?;
        Ok(SdpaTrain {
            plan: p.plan,
            _config: p.config,
            _graph: p.graph,
            _op: op,
            _tensors: tensors,
            layout: *l,
            pass,
            scale,
            workspace: p.workspace,
        })
    }

    /// Bytes of device workspace [`execute`](Self::execute) needs (0 is possible).
    pub fn workspace_bytes(&self) -> usize {
        self.workspace
    }

    /// Enqueues the pass on `cudnn`'s stream. `qkv`: the bf16 qkv buffer (Q, K, V in place);
    /// `o`: the bf16 output [batch·seq, D]; `stats`: the f32 log-sum-exps [batch, heads, seq]
    /// (written by the forward, read by the backward); the backward's `grads`: the bf16 dO
    /// [batch·seq, D] and the bf16 dqkv buffer (laid out as qkv, overwritten).
    ///
    /// # Safety
    /// Pointers are device pointers to buffers of the layout's sizes, valid until the stream's
    /// work completes; outputs and `workspace` (at least [`Self::workspace_bytes`]) overlap
    /// nothing else in flight. `cudnn` is the handle the plan was built with.
    pub unsafe fn execute(
        &self,
        cudnn: &Cudnn,
        qkv: u64,
        o: u64,
        stats: u64,
        grads: Option<(u64, u64)>,
        workspace: u64,
    ) -> Result<(), SdpaError> {
        let [q, k, v] = self.layout.qkv_pointers(qkv);
        let mut named = vec![("q", q), ("k", k), ("v", v), ("o", o), ("stats", stats)];
        let mut uids = vec![UID_Q, UID_K, UID_V, UID_O, UID_STATS];
        match (self.pass, grads) {
            (SdpaPass::Forward, _) => {}
            (SdpaPass::Backward, Some((dout, dqkv))) => {
                let [dq, dk, dv] = self.layout.qkv_pointers(dqkv);
                named.extend([("dO", dout), ("dQ", dq), ("dK", dk), ("dV", dv)]);
                uids.extend([UID_DO, UID_DQ, UID_DK, UID_DV]);
            }
            (SdpaPass::Backward, None) => {
                return Err(SdpaError::Invalid("the backward needs dO and dqkv".into()))
            }
        }
        uids.push(UID_SCALE);
        // SAFETY: the caller's pointers, per this function's contract.
        unsafe {
            run_plan(
                cudnn,
                &self.plan,
                &named,
                &uids,
                &self.scale,
                (workspace, self.workspace),
                format_args!("the SDPA {:?} plan for {}", self.pass, self.layout),
            )
        }
    }
}

/// The backend API underneath: loading checks, status checks, and an owning descriptor.
#[cfg(feature = "cuda-engine")]
mod backend {
    use super::{SdpaDtype, SdpaError, TensorSpec, MIN_CUDNN_VERSION};
    use cudarc::cudnn::sys;
    use std::ffi::{c_void, CStr};
    use std::fmt;
    use std::sync::OnceLock;

    pub(super) use sys::cudnnBackendAttributeName_t as Attr;
    pub(super) use sys::cudnnBackendAttributeType_t as Ty;
    pub(super) use sys::cudnnBackendDescriptorType_t as Kind;

    /// Every cuDNN function this module calls. cudarc looks each one up on its first call and
    /// panics if it is missing, so all are looked up here first. (cudarc also converts every
    /// returned status into its 9.21 `cudnnStatus_t` enum: a newer cuDNN returning a code 9.21
    /// does not know would be an invalid enum value; cuDNN 9 has only added codes within the
    /// existing ranges so far.)
    const SYMBOLS: [&str; 12] = [
        "cudnnGetVersion",
        "cudnnGetErrorString",
        "cudnnGetLastErrorString",
        "cudnnCreate",
        "cudnnDestroy",
        "cudnnSetStream",
        "cudnnBackendCreateDescriptor",
        "cudnnBackendDestroyDescriptor",
        "cudnnBackendSetAttribute",
        "cudnnBackendGetAttribute",
        "cudnnBackendFinalize",
        "cudnnBackendExecute",
    ];

    #[derive(Debug, Clone, Copy)]
    pub(super) enum Probe {
        NotFound,
        NoVersion,
        Found {
            version: usize,
            missing: Option<&'static str>,
        },
    }

    /// Opens libcudnn (through cudarc's loader) and looks up [`SYMBOLS`]. A library that opened
    /// stays open (cudarc keeps it), so that answer is kept; "not found" is not, so a later
    /// call finds a library preloaded in between (`libs::preload` opens cuDNN from Python's
    /// wheels by full path, after which cudarc's opening by name finds it).
    pub(super) fn probe() -> Probe {
        static FOUND: OnceLock<Probe> = OnceLock::new();
        if let Some(p) = FOUND.get() {
            return *p;
        }
        // SAFETY: tries to open cudarc's candidate library names; runs no library code other
        // than the libraries' initialisers.
        if !unsafe { sys::is_culib_present() } {
            return Probe::NotFound;
        }
        *FOUND.get_or_init(|| {
            // SAFETY: a candidate opened just above, so cudarc's loader opens it rather than
            // panicking.
            let lib = unsafe { sys::culib() };
            // SAFETY: symbol lookups only; nothing is called through the addresses.
            let has = |name: &str| unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_ok();
            if !has("cudnnGetVersion") {
                return Probe::NoVersion;
            }
            // SAFETY: present (checked above); takes no arguments.
            let version = unsafe { sys::cudnnGetVersion() };
            Probe::Found {
                version,
                missing: SYMBOLS.into_iter().find(|&name| !has(name)),
            }
        })
    }

    /// The loaded cuDNN's version, once it is known to open, to be new enough for the unified
    /// SDPA operation and to have every function this module calls.
    pub(super) fn require() -> Result<usize, SdpaError> {
        match probe() {
            Probe::NotFound => Err(SdpaError::Missing),
            Probe::NoVersion => Err(SdpaError::MissingSymbol {
                symbol: "cudnnGetVersion",
            }),
            Probe::Found { version, .. } if version < MIN_CUDNN_VERSION => Err(SdpaError::TooOld {
                found: version,
                needed: MIN_CUDNN_VERSION,
            }),
            Probe::Found {
                missing: Some(symbol),
                ..
            } => Err(SdpaError::MissingSymbol { symbol }),
            Probe::Found { version, .. } => Ok(version),
        }
    }

    /// `status` as an error of `call` on `what`: cuDNN's name for it and its last error message.
    pub(super) fn cudnn_error(
        status: sys::cudnnStatus_t,
        call: &'static str,
        what: fmt::Arguments<'_>,
    ) -> SdpaError {
        // SAFETY: cudnnGetErrorString returns a pointer to a static C string (or null).
        let name = unsafe { sys::cudnnGetErrorString(status) };
        let name = if name.is_null() {
            format!("{status:?}")
        } else {
            // SAFETY: non-null, NUL-terminated, static (above).
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        let mut buffer: [std::ffi::c_char; 1024] = [0; 1024];
        // SAFETY: the buffer is writable for its length; cuDNN writes this thread's last error
        // message (possibly empty) into it.
        unsafe { sys::cudnnGetLastErrorString(buffer.as_mut_ptr(), buffer.len()) };
        buffer[buffer.len() - 1] = 0;
        // SAFETY: NUL-terminated within the buffer (its last element is 0).
        let last = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy();
        let last: Vec<&str> = last.split_whitespace().collect();
        let mut status = format!("{name} ({what})");
        if !last.is_empty() {
            status.push_str(": ");
            status.push_str(&last.join(" "));
        }
        SdpaError::Cudnn { call, status }
    }

    /// Ok for CUDNN_STATUS_SUCCESS, else [`cudnn_error`].
    pub(super) fn check(
        status: sys::cudnnStatus_t,
        call: &'static str,
        what: fmt::Arguments<'_>,
    ) -> Result<(), SdpaError> {
        match status {
            sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS => Ok(()),
            _ => Err(cudnn_error(status, call, what)),
        }
    }

    /// As [`check`], but the CUDNN_STATUS_NOT_SUPPORTED family (3000-3999) becomes
    /// [`SdpaError::Unsupported`]: while building, it means this cuDNN cannot run this graph.
    fn check_build(
        status: sys::cudnnStatus_t,
        call: &'static str,
        what: fmt::Arguments<'_>,
    ) -> Result<(), SdpaError> {
        match check(status, call, what) {
            Err(SdpaError::Cudnn { call, status: text }) if status as u32 / 1000 == 3 => {
                Err(SdpaError::Unsupported(format!("{call}: {text}")))
            }
            other => other,
        }
    }

    /// An owned backend descriptor; Drop destroys it.
    pub(super) struct Desc {
        raw: sys::cudnnBackendDescriptor_t,
        what: &'static str,
    }

    impl Desc {
        pub(super) fn new(kind: Kind, what: &'static str) -> Result<Self, SdpaError> {
            let mut raw = std::ptr::null_mut();
            // SAFETY: `raw` is a valid out-pointer.
            let status = unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) };
            check(
                status,
                "cudnnBackendCreateDescriptor",
                format_args!("{kind:?} for the {what}"),
            )?;
            Ok(Desc { raw, what })
        }

        pub(super) fn raw(&self) -> sys::cudnnBackendDescriptor_t {
            self.raw
        }

        /// # Safety
        /// `values` points at `count` elements of the C type cuDNN expects for `ty`.
        unsafe fn set(
            &self,
            attr: Attr,
            ty: Ty,
            count: usize,
            values: *const c_void,
        ) -> Result<(), SdpaError> {
            // SAFETY: a live descriptor; `values` per this function's contract.
            let status =
                unsafe { sys::cudnnBackendSetAttribute(self.raw, attr, ty, count as i64, values) };
            check(
                status,
                "cudnnBackendSetAttribute",
                format_args!("{attr:?} of the {}", self.what),
            )
        }

        pub(super) fn set_i64s(&self, attr: Attr, values: &[i64]) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_INT64 elements are int64_t.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_INT64,
                    values.len(),
                    values.as_ptr().cast(),
                )
            }
        }

        pub(super) fn set_bool(&self, attr: Attr, value: bool) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_BOOLEAN is C's bool, one byte as Rust's.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_BOOLEAN,
                    1,
                    std::ptr::from_ref(&value).cast(),
                )
            }
        }

        pub(super) fn set_data_type(
            &self,
            attr: Attr,
            value: sys::cudnnDataType_t,
        ) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_DATA_TYPE is the C enum cudnnDataType_t, which cudarc's
            // `repr(u32)` enum matches.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_DATA_TYPE,
                    1,
                    std::ptr::from_ref(&value).cast(),
                )
            }
        }

        pub(super) fn set_heur_mode(
            &self,
            attr: Attr,
            value: sys::cudnnBackendHeurMode_t,
        ) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_HEUR_MODE is the C enum cudnnBackendHeurMode_t (`repr(u32)`).
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_HEUR_MODE,
                    1,
                    std::ptr::from_ref(&value).cast(),
                )
            }
        }

        pub(super) fn set_handle(
            &self,
            attr: Attr,
            value: sys::cudnnHandle_t,
        ) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_HANDLE elements are cudnnHandle_t.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_HANDLE,
                    1,
                    std::ptr::from_ref(&value).cast(),
                )
            }
        }

        pub(super) fn set_descs(&self, attr: Attr, values: &[&Desc]) -> Result<(), SdpaError> {
            let raw: Vec<sys::cudnnBackendDescriptor_t> = values.iter().map(|d| d.raw).collect();
            // SAFETY: CUDNN_TYPE_BACKEND_DESCRIPTOR elements are cudnnBackendDescriptor_t, each
            // a live descriptor owned by `values`.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                    raw.len(),
                    raw.as_ptr().cast(),
                )
            }
        }

        pub(super) fn set_pointers(
            &self,
            attr: Attr,
            values: &[*mut c_void],
        ) -> Result<(), SdpaError> {
            // SAFETY: CUDNN_TYPE_VOID_PTR elements are void*.
            unsafe {
                self.set(
                    attr,
                    Ty::CUDNN_TYPE_VOID_PTR,
                    values.len(),
                    values.as_ptr().cast(),
                )
            }
        }

        pub(super) fn get_i64(&self, attr: Attr) -> Result<i64, SdpaError> {
            let mut value = 0i64;
            let mut count = 0i64;
            // SAFETY: a live, finalised descriptor; room for the one int64_t requested.
            let status = unsafe {
                sys::cudnnBackendGetAttribute(
                    self.raw,
                    attr,
                    Ty::CUDNN_TYPE_INT64,
                    1,
                    &mut count,
                    std::ptr::from_mut(&mut value).cast(),
                )
            };
            check(
                status,
                "cudnnBackendGetAttribute",
                format_args!("{attr:?} of the {}", self.what),
            )?;
            Ok(value)
        }

        /// Finalises the descriptor; NOT_SUPPORTED statuses become [`SdpaError::Unsupported`].
        pub(super) fn finalize(&self) -> Result<(), SdpaError> {
            // SAFETY: a live descriptor.
            let status = unsafe { sys::cudnnBackendFinalize(self.raw) };
            check_build(
                status,
                "cudnnBackendFinalize",
                format_args!("the {}", self.what),
            )
        }
    }

    impl Drop for Desc {
        fn drop(&mut self) {
            // SAFETY: created by cudnnBackendCreateDescriptor, owned by `self`, destroyed once.
            // A failure here has nowhere to go.
            let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.raw) };
        }
    }

    /// A finalised backend tensor for `spec` (cudnn-frontend's TensorBuilder::build: data type,
    /// dims, strides, uid, 16-byte alignment, virtual / by-value flags).
    pub(super) fn tensor(spec: &TensorSpec) -> Result<Desc, SdpaError> {
        let t = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR, spec.role.name())?;
        let dtype = match spec.dtype {
            SdpaDtype::Bf16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            SdpaDtype::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        };
        t.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, &spec.dims)?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_STRIDES, &spec.strides)?;
        t.set_i64s(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, &[spec.uid])?;
        t.set_i64s(
            Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
            &[super::ALIGNMENT as i64],
        )?;
        if spec.is_virtual {
            t.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL, true)?;
        }
        if spec.by_value {
            t.set_bool(Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE, true)?;
        }
        t.finalize()?;
        Ok(t)
    }

    /// The engine configs heuristics `mode` ranks for `graph`, best first (cudnn-frontend's
    /// get_heuristics_list_impl: count query, then one ENGINECFG descriptor per result).
    pub(super) fn heuristics(
        graph: &Desc,
        mode: sys::cudnnBackendHeurMode_t,
    ) -> Result<Vec<Desc>, SdpaError> {
        let heur = Desc::new(
            Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR,
            "engine heuristics",
        )?;
        heur.set_descs(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
        heur.set_heur_mode(Attr::CUDNN_ATTR_ENGINEHEUR_MODE, mode)?;
        heur.finalize()?;
        let results = Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS;
        let mut count = 0i64;
        // SAFETY: a finalised heuristics descriptor; requesting 0 elements only writes the count.
        let status = unsafe {
            sys::cudnnBackendGetAttribute(
                heur.raw,
                results,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                0,
                &mut count,
                std::ptr::null_mut(),
            )
        };
        check(
            status,
            "cudnnBackendGetAttribute",
            format_args!("the number of {results:?}"),
        )?;
        let mut configs = (0..count.max(0))
            .map(|_| Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|d| d.raw).collect();
        let mut filled = 0i64;
        // SAFETY: `raw` holds `count` live, not yet finalised ENGINECFG descriptors, which
        // cuDNN fills in place.
        let status = unsafe {
            sys::cudnnBackendGetAttribute(
                heur.raw,
                results,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                raw.len() as i64,
                &mut filled,
                raw.as_mut_ptr().cast(),
            )
        };
        check(
            status,
            "cudnnBackendGetAttribute",
            format_args!("{results:?}"),
        )?;
        configs.truncate(usize::try_from(filled).unwrap_or(0));
        Ok(configs)
    }

    /// A finalised execution plan of `config` (cudnn-frontend's ExecutionPlanBuilder::build;
    /// the handle as well, which older cuDNN 9 releases require).
    pub(super) fn plan(config: &Desc, handle: sys::cudnnHandle_t) -> Result<Desc, SdpaError> {
        let plan = Desc::new(
            Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR,
            "execution plan",
        )?;
        plan.set_handle(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, handle)?;
        plan.set_descs(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[config])?;
        plan.finalize()?;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIT_B: SdpaLayout = SdpaLayout {
        batch: 64,
        heads: 12,
        seq: 1568,
        head_dim: 64,
    };
    const TINY: SdpaLayout = SdpaLayout {
        batch: 2,
        heads: 3,
        seq: 5,
        head_dim: 8,
    };

    fn spec(specs: &[TensorSpec], role: TensorRole) -> &TensorSpec {
        let found: Vec<_> = specs.iter().filter(|s| s.role == role).collect();
        assert_eq!(found.len(), 1, "{role:?} appears once");
        found[0]
    }

    fn offset(s: &TensorSpec, idx: [i64; 4]) -> i64 {
        s.strides.iter().zip(idx).map(|(st, i)| st * i).sum()
    }

    #[test]
    fn vit_b_specs() {
        let specs = sdpa_tensors(&VIT_B);
        assert_eq!(specs.len(), 5);
        let d = 768;
        for role in [TensorRole::Q, TensorRole::K, TensorRole::V] {
            let s = spec(&specs, role);
            assert_eq!(s.dims, vec![64, 12, 1568, 64]);
            assert_eq!(s.strides, vec![1568 * 3 * d, 64, 3 * d, 1]);
            assert_eq!(s.dtype, SdpaDtype::Bf16);
            assert!(!s.by_value && !s.is_virtual);
        }
        let o = spec(&specs, TensorRole::O);
        assert_eq!(o.dims, vec![64, 12, 1568, 64]);
        assert_eq!(o.strides, vec![1568 * d, 64, d, 1]);
        assert_eq!(o.dtype, SdpaDtype::Bf16);
        let scale = spec(&specs, TensorRole::Scale);
        assert_eq!(scale.dims, vec![1, 1, 1, 1]);
        assert_eq!(scale.strides, vec![1, 1, 1, 1]);
        assert!(scale.by_value && !scale.is_virtual);
        assert_eq!(scale.dtype, SdpaDtype::F32);
        // The far corner of each view is the buffer's last element.
        let corner = [63, 11, 1567, 63];
        assert_eq!(
            2 * d + offset(spec(&specs, TensorRole::V), corner),
            VIT_B.qkv_len() - 1
        );
        assert_eq!(offset(o, corner), VIT_B.out_len() - 1);
        assert_eq!(VIT_B.qkv_len(), 64 * 1568 * 2304);
    }

    #[test]
    fn uids_distinct_and_named() {
        for l in [VIT_B, TINY] {
            let specs = sdpa_tensors(&l);
            let mut uids: Vec<i64> = specs.iter().map(|s| s.uid).collect();
            uids.sort_unstable();
            uids.dedup();
            assert_eq!(uids.len(), specs.len());
            assert_eq!(spec(&specs, TensorRole::Q).uid, UID_Q);
            assert_eq!(spec(&specs, TensorRole::K).uid, UID_K);
            assert_eq!(spec(&specs, TensorRole::V).uid, UID_V);
            assert_eq!(spec(&specs, TensorRole::O).uid, UID_O);
            assert_eq!(spec(&specs, TensorRole::Scale).uid, UID_SCALE);
            assert!(specs
                .iter()
                .all(|s| s.dims.len() == 4 && s.strides.len() == 4));
            assert!(specs.iter().all(|s| s.strides[3] == 1));
        }
    }

    /// Every (b, h, s, d) of Q, K and V lands on the row-major qkv element
    /// [b, s, which, h, d], and the three views together cover the buffer exactly once; O
    /// covers the row-major [b, s, h, d] output exactly once.
    #[test]
    fn strides_address_row_major_qkv_and_output() {
        for l in [
            TINY,
            SdpaLayout {
                batch: 1,
                heads: 2,
                seq: 64,
                head_dim: 16,
            },
        ] {
            let specs = sdpa_tensors(&l);
            let d_model = l.d_model();
            let mut qkv_hits = vec![0u32; l.qkv_len() as usize];
            let mut out_hits = vec![0u32; l.out_len() as usize];
            let views = [(TensorRole::Q, 0), (TensorRole::K, 1), (TensorRole::V, 2)];
            for b in 0..l.batch {
                for h in 0..l.heads {
                    for s in 0..l.seq {
                        for d in 0..l.head_dim {
                            let idx = [b, h, s, d];
                            for (role, which) in views {
                                let got = which * d_model + offset(spec(&specs, role), idx);
                                let want =
                                    ((b * l.seq + s) * 3 + which) * d_model + h * l.head_dim + d;
                                assert_eq!(got, want, "{role:?} at {idx:?}");
                                qkv_hits[got as usize] += 1;
                            }
                            let got = offset(spec(&specs, TensorRole::O), idx);
                            let want = (b * l.seq + s) * d_model + h * l.head_dim + d;
                            assert_eq!(got, want, "O at {idx:?}");
                            out_hits[got as usize] += 1;
                        }
                    }
                }
            }
            assert!(qkv_hits.iter().all(|&n| n == 1));
            assert!(out_hits.iter().all(|&n| n == 1));
        }
    }

    /// The training graphs' tensors: every role once, distinct uids, the statistics the
    /// engine's [batch, heads, seq] log-sum-exps, dQ/dK/dV strided as Q in the dqkv buffer.
    #[test]
    fn training_tensors_address_the_engines_buffers() {
        let specs = sdpa_train_tensors(&VIT_B);
        let mut uids: Vec<i64> = specs.iter().map(|s| s.uid).collect();
        uids.sort();
        uids.dedup();
        assert_eq!(uids.len(), 10);
        let stats = spec(&specs, TensorRole::Stats);
        assert_eq!(stats.dtype, SdpaDtype::F32);
        let (b, h, n) = (VIT_B.batch, VIT_B.heads, VIT_B.seq);
        assert_eq!(offset(stats, [1, 2, 3, 0]), (h + 2) * n + 3);
        assert_eq!(offset(stats, [b - 1, h - 1, n - 1, 0]), b * h * n - 1);
        let q = spec(&specs, TensorRole::Q);
        for role in [TensorRole::DQ, TensorRole::DK, TensorRole::DV] {
            let d = spec(&specs, role);
            assert_eq!(
                (&d.dims, &d.strides, d.dtype),
                (&q.dims, &q.strides, q.dtype)
            );
        }
        let (o, d_o) = (spec(&specs, TensorRole::O), spec(&specs, TensorRole::DO));
        assert_eq!(o.strides, d_o.strides);
    }

    #[test]
    fn qkv_pointers_are_d_elements_apart() {
        let base = 0x7f00_0000_0000u64;
        let [q, k, v] = VIT_B.qkv_pointers(base);
        assert_eq!((q, k - q, v - k), (base, 768 * 2, 768 * 2));
        assert!([q, k, v].iter().all(|p| p % ALIGNMENT == 0));
    }

    #[test]
    fn validate_rejects_bad_layouts() {
        assert!(VIT_B.validate().is_ok());
        assert!(TINY.validate().is_ok());
        let bad = [
            SdpaLayout {
                head_dim: 12,
                ..TINY
            },
            SdpaLayout { seq: 0, ..TINY },
            SdpaLayout { batch: -1, ..TINY },
            SdpaLayout {
                heads: 1 << 40,
                seq: 1 << 20,
                ..TINY
            },
        ];
        for l in bad {
            assert!(matches!(l.validate(), Err(SdpaError::Invalid(_))), "{l:?}");
        }
    }

    #[test]
    fn versions_and_messages() {
        assert_eq!(version_string(&91301), "9.13.1");
        assert_eq!(version_string(&92100), "9.21.0");
        assert_eq!(version_string(&8907), "8.9.7");
        let errors = [
            SdpaError::Missing,
            SdpaError::MissingSymbol {
                symbol: "cudnnBackendExecute",
            },
            SdpaError::TooOld {
                found: 91000,
                needed: MIN_CUDNN_VERSION,
            },
            SdpaError::Unsupported(format!("{VIT_B}")),
            SdpaError::Invalid("x".into()),
            SdpaError::Cudnn {
                call: "cudnnBackendFinalize",
                status: "CUDNN_STATUS_BAD_PARAM".into(),
            },
            SdpaError::Driver("CUDA_ERROR_INVALID_CONTEXT".into()),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
        }
        let too_old = SdpaError::TooOld {
            found: 91000,
            needed: MIN_CUDNN_VERSION,
        }
        .to_string();
        assert!(
            too_old.contains("9.10.0") && too_old.contains("9.13.1"),
            "{too_old}"
        );
    }

    /// Without libcudnn (as on a machine with no GPU stack), the loader reports None instead
    /// of panicking, and the constructors' check says Missing; with one, a version.
    #[cfg(feature = "cuda-engine")]
    #[test]
    fn loading_never_panics() {
        match cudnn_version() {
            None => assert!(matches!(
                backend::require(),
                Err(SdpaError::Missing) | Err(SdpaError::MissingSymbol { .. })
            )),
            Some(v) => {
                assert!(v > 0);
                if v < MIN_CUDNN_VERSION {
                    assert!(matches!(backend::require(), Err(SdpaError::TooOld { .. })));
                }
            }
        }
    }
}
