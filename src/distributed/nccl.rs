//! NCCL on CUDA. The library is opened here rather than through cudarc's loader, which looks
//! for `libnccl.so` only: NCCL's packages (pip's `nvidia-nccl-cu12`, NVIDIA's debs) install
//! `libnccl.so.2`. Looked for: `MARLIN_NCCL_LIBRARY` (a path), `libnccl.so.2`, `libnccl.so`.
//!
//! Rank 0 makes the unique id and publishes it in the store; every rank joins with
//! `ncclCommInitRank` on its own device. Host buffers (burn's step: the same bucket Gloo
//! reduces; the losses) are staged through one device buffer of cudarc's on this device: sum
//! in NCCL, the mean on the host (any NCCL 2.x, no `ncclAvg`). The training engine's gradients
//! stay on the device: averaged in place (`ncclAvg`, NCCL 2.10 or newer) on this engine's own
//! stream, which waits for the engine's stream and which the engine's stream waits for before
//! the update, so each bucket's all-reduce overlaps the rest of the backward.

use super::env::Launch;
use super::store::Client;
use super::{DistError, Engine};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;
use std::time::Duration;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([c_char; 128]);

type Comm = *mut c_void;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
/// `ncclAvg` (NCCL 2.10 and newer).
const NCCL_AVG: c_int = 4;
/// The first NCCL version with `ncclAvg` (`NCCL_VERSION(2, 10, 0)`).
const NCCL_AVG_VERSION: c_int = 21000;

/// The NCCL functions this engine calls, from the opened library.
struct Api {
    _lib: libloading::Library,
    version: unsafe extern "C" fn(*mut c_int) -> c_int,
    unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    destroy: unsafe extern "C" fn(Comm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Api {
    fn open() -> Result<Self, String> {
        let mut names: Vec<String> = std::env::var("MARLIN_NCCL_LIBRARY")
            .ok()
            .filter(|s| !s.is_empty())
            .into_iter()
            .collect();
        names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
        let mut tried = Vec::new();
        for name in &names {
            // Opening a shared library runs its initialisers; NCCL's have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::from_lib(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => tried.push(format!("{name} ({e})")),
            }
        }
        Err(format!(
            "NCCL not found: tried {}; install NCCL (pip's nvidia-nccl-cu12 or NVIDIA's \
             libnccl2) or set MARLIN_NCCL_LIBRARY to libnccl.so.2's path",
            tried.join(", ")
        ))
    }

    fn from_lib(lib: libloading::Library) -> Result<Self, String> {
        // Each symbol is looked up with NCCL's documented C signature (nccl.h, 2.x).
        unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name).map_err(|e| e.to_string())?
                };
            }
            Ok(Self {
                version: sym!(b"ncclGetVersion\0"),
                unique_id: sym!(b"ncclGetUniqueId\0"),
                init_rank: sym!(b"ncclCommInitRank\0"),
                all_reduce: sym!(b"ncclAllReduce\0"),
                broadcast: sym!(b"ncclBroadcast\0"),
                destroy: sym!(b"ncclCommDestroy\0"),
                error_string: sym!(b"ncclGetErrorString\0"),
                _lib: lib,
            })
        }
    }

    fn check(&self, rc: c_int, what: &str) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        // ncclGetErrorString returns a static NUL-terminated string.
        let msg = unsafe { CStr::from_ptr((self.error_string)(rc)) }.to_string_lossy();
        Err(format!("{what}: {msg} (NCCL error {rc})"))
    }
}

/// A communicator on one device, with the device buffer collectives stage through.
pub struct Nccl {
    api: Api,
    /// `ncclGetVersion`'s code (2.10.0 is 21000).
    version: c_int,
    comm: Comm,
    stream: Arc<CudaStream>,
    buffer: Option<CudaSlice<f32>>,
}

// The communicator is used by one thread at a time (behind the group's mutex).
unsafe impl Send for Nccl {}

impl Nccl {
    pub fn connect(
        client: &Client,
        launch: &Launch,
        device: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let unavailable = |m: String| DistError::Unavailable(m);
        let api = Api::open().map_err(unavailable)?;
        let mut v: c_int = 0;
        api.check(unsafe { (api.version)(&mut v) }, "ncclGetVersion")
            .map_err(unavailable)?;
        let key = "nccl/id";
        let id = if launch.rank == 0 {
            let mut id = UniqueId([0; 128]);
            api.check(unsafe { (api.unique_id)(&mut id) }, "ncclGetUniqueId")
                .map_err(unavailable)?;
            let bytes: Vec<u8> = id.0.iter().map(|&c| c as u8).collect();
            client.set(key, &bytes)?;
            id
        } else {
            let bytes = client
                .get(key, timeout)?
                .ok_or_else(|| DistError::Collective {
                    engine: "NCCL",
                    what: "the id exchange".into(),
                    msg: "rank 0 published no NCCL id".into(),
                    timeout_s: timeout.as_secs(),
                })?;
            let mut id = UniqueId([0; 128]);
            for (d, s) in id.0.iter_mut().zip(bytes) {
                *d = s as c_char;
            }
            id
        };
        let ctx =
            CudaContext::new(device).map_err(|e| unavailable(format!("cuda:{device}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("cuda:{device}: {e}")))?;
        ctx.bind_to_thread()
            .map_err(|e| unavailable(format!("cuda:{device}: {e}")))?;
        let mut comm: Comm = std::ptr::null_mut();
        api.check(
            unsafe { (api.init_rank)(&mut comm, launch.world as c_int, id, launch.rank as c_int) },
            &format!("ncclCommInitRank (NCCL {v}, cuda:{device})"),
        )
        .map_err(|msg| DistError::Collective {
            engine: "NCCL",
            what: "the communicator's start".into(),
            msg,
            timeout_s: timeout.as_secs(),
        })?;
        Ok(Self {
            api,
            version: v,
            comm,
            stream,
            buffer: None,
        })
    }

    /// The staging buffer, at least `n` floats.
    fn staged(&mut self, n: usize) -> Result<&mut CudaSlice<f32>, String> {
        if self.buffer.as_ref().is_none_or(|b| b.len() < n) {
            self.buffer = Some(
                self.stream
                    .alloc_zeros::<f32>(n.max(1))
                    .map_err(|e| e.to_string())?,
            );
        }
        self.buffer
            .as_mut()
            .ok_or_else(|| "no staging buffer".to_string())
    }

    fn run(&mut self, data: &mut [f32], root: Option<usize>) -> Result<(), String> {
        let n = data.len();
        if n == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        let (comm, all_reduce, broadcast) = (self.comm, self.api.all_reduce, self.api.broadcast);
        let buf = self.staged(n)?;
        let mut view = buf.slice_mut(0..n);
        stream
            .memcpy_htod(&*data, &mut view)
            .map_err(|e| e.to_string())?;
        let rc = {
            let (ptr, _sync) = view.device_ptr_mut(&stream);
            let p = ptr as *mut c_void;
            let s = stream.cu_stream() as *mut c_void;
            // In place on one device buffer of `n` floats, on this rank's stream.
            unsafe {
                match root {
                    None => all_reduce(p, p, n, NCCL_FLOAT32, NCCL_SUM, comm, s),
                    Some(r) => broadcast(p, p, n, NCCL_FLOAT32, r as c_int, comm, s),
                }
            }
        };
        self.api.check(
            rc,
            if root.is_none() {
                "ncclAllReduce"
            } else {
                "ncclBroadcast"
            },
        )?;
        let view = self.buffer.as_ref().ok_or("no staging buffer")?.slice(0..n);
        stream.memcpy_dtoh(&view, data).map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Engine for Nccl {
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), String> {
        self.run(data, None)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), String> {
        self.run(data, Some(root))
    }

    fn barrier(&mut self) -> Result<(), String> {
        let mut one = [0f32];
        self.run(&mut one, None)
    }

    fn name(&self) -> &'static str {
        "NCCL"
    }

    fn on_device(&self) -> bool {
        self.version >= NCCL_AVG_VERSION
    }

    fn all_reduce_mean_device(
        &mut self,
        ptr: u64,
        n: usize,
        after: &CudaStream,
    ) -> Result<(), String> {
        if !self.on_device() {
            return Err(format!(
                "NCCL {} has no ncclAvg (2.10 or newer)",
                self.version
            ));
        }
        if n == 0 {
            return Ok(());
        }
        // After the gradients' producer, on this engine's stream.
        self.stream.join(after).map_err(|e| e.to_string())?;
        let p = ptr as *mut c_void;
        let s = self.stream.cu_stream() as *mut c_void;
        // In place on `n` floats of the caller's device buffer (the communicator's device).
        let rc = unsafe { (self.api.all_reduce)(p, p, n, NCCL_FLOAT32, NCCL_AVG, self.comm, s) };
        self.api.check(rc, "ncclAllReduce (device buffer)")
    }

    fn join_device(&mut self, stream: &CudaStream) -> Result<(), String> {
        stream.join(&self.stream).map_err(|e| e.to_string())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            unsafe { (self.api.destroy)(self.comm) };
        }
    }
}
