//! Data-parallel training across processes, launched as torch DDP is (torchrun or Slurm, see
//! [`env::Launch`]): one process per device, each step's gradients averaged across the ranks
//! with one all-reduce per optimiser update, rank 0 alone writing the run folder.
//!
//! The collectives are an existing engine's, never hand-written: Gloo on the CPU (Debian's
//! `libgloo-dev`: where its headers are, the build makes a shim the binary carries and opens
//! at run time) and NCCL on CUDA. The ranks
//! meet through a small key-value store rank 0 serves on `MASTER_ADDR:MASTER_PORT`
//! ([`store`], the design of torch's TCPStore), which also tells which rank is gone when a
//! collective fails. Every wait has a timeout.

pub mod env;
#[cfg(marlin_gloo)]
mod gloo;
pub mod grads;
#[cfg(feature = "cuda")]
mod nccl;
pub mod store;

pub use env::Launch;
pub use grads::{all_reduce_gradients, weights_digest};

use crate::backend::DeviceSpec;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a multi-process run could not start or go on. One line naming the rank or variable.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launcher variable is malformed.
    #[error("{var}: {msg}")]
    Env { var: String, msg: String },
    /// The store (rank 0's meeting point) cannot be served or reached.
    #[error("the ranks' store at {addr}: {msg}")]
    Store { addr: String, msg: String },
    /// A rank stopped answering: every other rank stops.
    #[error(
        "rank {rank} is gone ({detail}): every rank stops; the last checkpoint is intact, run \
         the same command with --resume to go on"
    )]
    RankGone { rank: usize, detail: String },
    /// A collective failed or timed out with every rank still connected.
    #[error(
        "{engine} {what} failed ({msg}); no rank is known to be gone: a rank may hang or run \
         slower than the timeout ({timeout_s} s, --dist-timeout)"
    )]
    Collective {
        engine: &'static str,
        what: String,
        msg: String,
        timeout_s: u64,
    },
    /// The ranks disagree about something they must share (config, options, weights).
    #[error("rank {rank}'s {what} differs from rank 0's ({mine} vs {theirs}): start every rank with the same command, config and weights")]
    Mismatch {
        rank: usize,
        what: String,
        mine: String,
        theirs: String,
    },
    /// This build or machine lacks the engine.
    #[error("{0}")]
    Unavailable(String),
}

/// The collectives of one engine on flat f32 buffers in host memory.
pub trait Engine: Send {
    /// In-place element-wise sum across the ranks.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), String>;
    /// Rank `root`'s `data` into every rank's.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), String>;
    fn barrier(&mut self) -> Result<(), String>;
    fn name(&self) -> &'static str;
    /// Whether [`Engine::all_reduce_mean_device`] works (NCCL 2.10 or newer, for `ncclAvg`).
    #[cfg(feature = "cuda-engine")]
    fn on_device(&self) -> bool {
        false
    }
    /// In-place mean across the ranks of `n` f32 values at device address `ptr` (on this
    /// engine's GPU), queued on the engine's own stream after the work `after` holds now:
    /// returns without waiting, the all-reduce overlapping what `after` runs next.
    #[cfg(feature = "cuda-engine")]
    fn all_reduce_mean_device(
        &mut self,
        _ptr: u64,
        _n: usize,
        _after: &cudarc::driver::CudaStream,
    ) -> Result<(), String> {
        Err(format!("{} averages host memory only", self.name()))
    }
    /// `stream`'s next work waits (on the device) for every collective queued so far.
    #[cfg(feature = "cuda-engine")]
    fn join_device(&mut self, _stream: &cudarc::driver::CudaStream) -> Result<(), String> {
        Ok(())
    }
}

/// Which engine a group runs its collectives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collectives {
    /// Gloo over TCP (the CPU backend, and any device whose engine is not built).
    Gloo,
    /// NCCL on this CUDA device.
    Nccl { device: usize },
}

/// Settings of a group.
#[derive(Debug, Clone, Copy)]
pub struct DistOptions {
    /// How long any wait for the other ranks may take (meeting, each collective).
    pub timeout: Duration,
    /// The least the training engine's gradients are all-reduced in at a time, in MiB
    /// (torch DDP's `bucket_cap_mb`): the backward hands on each bucket once it is final, and
    /// its all-reduce overlaps the rest of the backward. None: [`DEFAULT_BUCKET_MB`] on NCCL
    /// (on the device, on a stream of its own: the overlap costs the GPU nothing); on Gloo one
    /// all-reduce after the backward (Gloo sums on the CPU cores the backward is using:
    /// overlapped it made 2 ranks on 2 cores 1.11x slower, BENCHMARKS.md).
    pub bucket_mb: Option<f64>,
}

/// torch DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_MB: f64 = 25.0;

impl Default for DistOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            bucket_mb: None,
        }
    }
}

/// The group of this process's launch (None without a launcher) and the device it trains on.
/// Under a launch, a CUDA device is `cuda:LOCAL_RANK`, or `cuda:0` when `CUDA_VISIBLE_DEVICES`
/// leaves the process one GPU (Slurm's `--gpus-per-task=1`); its collectives are NCCL's, every
/// other device's Gloo's.
pub fn join(
    spec: DeviceSpec,
    opts: &DistOptions,
) -> Result<(Option<Arc<Group>>, DeviceSpec), DistError> {
    let Some(launch) = Launch::from_env()? else {
        return Ok((None, spec));
    };
    let spec = match spec {
        DeviceSpec::Cuda(i) => {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            let one = visible.is_some_and(|v| v.split(',').filter(|s| !s.is_empty()).count() == 1);
            DeviceSpec::Cuda(if one || i != 0 { i } else { launch.local_rank })
        }
        other => other,
    };
    let which = match spec {
        DeviceSpec::Cuda(device) => Collectives::Nccl { device },
        _ => Collectives::Gloo,
    };
    let g = Group::connect(launch, which, opts)?;
    Ok((Some(Arc::new(g)), spec))
}

/// This process's membership of a launch: its rank, the store, the engine.
pub struct Group {
    launch: Launch,
    store: Arc<store::Client>,
    engine: Mutex<Box<dyn Engine>>,
    timeout: Duration,
    bucket_len: usize,
    stats: Mutex<CommStats>,
    // Rank 0 serves the store for as long as the group lives.
    _server: Option<store::Server>,
}

/// What a group's collectives have cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    pub calls: u64,
    /// f32 values reduced or broadcast, summed over the calls.
    pub values: u64,
    /// Wall time inside the collectives (the wait for slower ranks included).
    pub seconds: f64,
    /// Of the training engine's steps: the time they waited for their all-reduces (the part
    /// not overlapped with the backward).
    pub waited: f64,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Group(rank {} of {}, store {})",
            self.launch.rank, self.launch.world, self.store.addr
        )
    }
}

impl Group {
    /// Meet the other ranks of `launch` and connect the engine.
    pub fn connect(
        launch: Launch,
        which: Collectives,
        opts: &DistOptions,
    ) -> Result<Self, DistError> {
        let server = if launch.rank == 0 {
            Some(store::Server::start(launch.master_port)?)
        } else {
            None
        };
        let client = Arc::new(store::Client::connect(
            &launch.master_addr,
            launch.master_port,
            launch.rank as u32,
            opts.timeout,
        )?);
        let engine: Box<dyn Engine> = match which {
            Collectives::Gloo => gloo_engine(&client, &launch, opts.timeout)?,
            Collectives::Nccl { device } => nccl_engine(&client, &launch, device, opts.timeout)?,
        };
        let g = Self {
            launch,
            store: client,
            engine: Mutex::new(engine),
            timeout: opts.timeout,
            bucket_len: match (opts.bucket_mb, which) {
                (Some(mb), _) => (mb.max(0.0) * (1 << 20) as f64 / 4.0) as usize,
                (None, Collectives::Nccl { .. }) => {
                    (DEFAULT_BUCKET_MB * (1 << 20) as f64 / 4.0) as usize
                }
                (None, Collectives::Gloo) => usize::MAX,
            },
            stats: Mutex::default(),
            _server: server,
        };
        g.agree("world size", &g.launch.world.to_string())?;
        Ok(g)
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world(&self) -> usize {
        self.launch.world
    }

    pub fn local_rank(&self) -> usize {
        self.launch.local_rank
    }

    /// Rank 0: the one that writes outputs and reports.
    pub fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    /// The least number of f32 gradients an all-reduce of the training engine carries (the
    /// last of an update excepted): [`DistOptions::bucket_mb`].
    pub fn bucket_len(&self) -> usize {
        self.bucket_len
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.lock().map(|e| e.name()).unwrap_or("?")
    }

    /// Count `seconds` as time a training step waited for its all-reduces.
    pub fn add_waited(&self, seconds: f64) {
        if let Ok(mut s) = self.stats.lock() {
            s.waited += seconds;
        }
    }

    /// The collectives' calls, volume and time so far.
    pub fn stats(&self) -> CommStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn with_engine<T>(
        &self,
        what: &str,
        values: usize,
        f: impl FnOnce(&mut dyn Engine) -> Result<T, String>,
    ) -> Result<T, DistError> {
        let t0 = Instant::now();
        let mut e = self.engine.lock().map_err(|_| {
            DistError::Unavailable("a thread failed while holding the collectives engine".into())
        })?;
        let name = e.name();
        let r = f(&mut **e).map_err(|msg| self.failed(name, what, msg));
        if let Ok(mut s) = self.stats.lock() {
            s.calls += 1;
            s.values += values as u64;
            s.seconds += t0.elapsed().as_secs_f64();
        }
        r
    }

    /// In-place sum of `data` across the ranks; `what` names it in errors.
    pub fn all_reduce_sum(&self, data: &mut [f32], what: &str) -> Result<(), DistError> {
        self.with_engine(what, data.len(), |e| e.all_reduce_sum(data))
    }

    /// In-place mean of `data` across the ranks.
    pub fn all_reduce_mean(&self, data: &mut [f32], what: &str) -> Result<(), DistError> {
        self.all_reduce_sum(data, what)?;
        let inv = 1.0 / self.world() as f32;
        data.iter_mut().for_each(|v| *v *= inv);
        Ok(())
    }

    /// Whether this group averages device memory in place ([`Group::all_reduce_mean_device`]):
    /// NCCL 2.10 or newer.
    #[cfg(feature = "cuda-engine")]
    pub fn device_collectives(&self) -> bool {
        self.engine.lock().is_ok_and(|e| e.on_device())
    }

    /// In-place mean of `n` f32 values at device address `ptr`, queued after the work `after`
    /// holds now and overlapping what it runs next; [`Group::join_device`] makes a stream
    /// wait for it. A failure to queue is an error here, a failure of the collective itself
    /// one at the next synchronisation.
    #[cfg(feature = "cuda-engine")]
    pub fn all_reduce_mean_device(
        &self,
        ptr: u64,
        n: usize,
        after: &cudarc::driver::CudaStream,
        what: &str,
    ) -> Result<(), DistError> {
        self.with_engine(what, n, |e| e.all_reduce_mean_device(ptr, n, after))
    }

    /// `stream` waits (on the device) for the collectives queued so far.
    #[cfg(feature = "cuda-engine")]
    pub fn join_device(&self, stream: &cudarc::driver::CudaStream) -> Result<(), DistError> {
        let mut e = self.engine.lock().map_err(|_| {
            DistError::Unavailable("a thread failed while holding the collectives engine".into())
        })?;
        let name = e.name();
        e.join_device(stream)
            .map_err(|msg| self.failed(name, "the wait for the gradients", msg))
    }

    /// Rank 0's `data` into every rank's.
    pub fn broadcast(&self, data: &mut [f32], what: &str) -> Result<(), DistError> {
        self.with_engine(what, data.len(), |e| e.broadcast(data, 0))
    }

    pub fn barrier(&self, what: &str) -> Result<(), DistError> {
        self.with_engine(what, 0, |e| e.barrier())
    }

    /// Every rank's `value` of `what` must be rank 0's: the first rank that differs is named,
    /// on that rank and on rank 0.
    pub fn agree(&self, what: &str, value: &str) -> Result<(), DistError> {
        let key = |r: usize| format!("agree/{what}/{r}");
        self.store.set(&key(self.rank()), value.as_bytes())?;
        let fetch = |r: usize| -> Result<String, DistError> {
            match self.store.get(&key(r), self.timeout)? {
                Some(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
                None => Err(self.failed(
                    "store",
                    &format!("check of the {what}"),
                    format!(
                        "rank {r} did not report within {} s",
                        self.timeout.as_secs()
                    ),
                )),
            }
        };
        let theirs = fetch(0)?;
        if self.rank() != 0 {
            if theirs != value {
                return Err(DistError::Mismatch {
                    rank: self.rank(),
                    what: what.into(),
                    mine: value.into(),
                    theirs,
                });
            }
            return Ok(());
        }
        for r in 1..self.world() {
            let other = fetch(r)?;
            if other != value {
                return Err(DistError::Mismatch {
                    rank: r,
                    what: what.into(),
                    mine: other,
                    theirs: value.into(),
                });
            }
        }
        Ok(())
    }

    /// The error of a failed collective: a rank whose store connection closed is named (rank
    /// 0 when the store itself is gone); else the engine's message and the timeout.
    fn failed(&self, engine: &'static str, what: &str, msg: String) -> DistError {
        // A dead peer's sockets close at once, but the store may register it a moment after
        // the engine noticed: look for a short while.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.store.gone() {
                Ok(g) if !g.is_empty() => {
                    return DistError::RankGone {
                        rank: g[0] as usize,
                        detail: format!("its connection closed during {what}"),
                    }
                }
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok(_) => {
                    return DistError::Collective {
                        engine,
                        what: what.into(),
                        msg,
                        timeout_s: self.timeout.as_secs(),
                    }
                }
                Err(DistError::RankGone { rank, .. }) => {
                    return DistError::RankGone {
                        rank,
                        detail: format!("its store stopped answering during {what}"),
                    }
                }
                Err(e) => return e,
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // A clean goodbye: the store does not count this rank as gone.
        self.store.bye();
    }
}

#[cfg(marlin_gloo)]
fn gloo_engine(
    client: &Arc<store::Client>,
    launch: &Launch,
    timeout: Duration,
) -> Result<Box<dyn Engine>, DistError> {
    // This rank listens where it reached rank 0 from, or on torch's GLOO_SOCKET_IFNAME.
    let iface = std::env::var("GLOO_SOCKET_IFNAME")
        .ok()
        .filter(|s| !s.is_empty());
    // A machine without libgloo: one line saying what to install, not a failed connection.
    gloo::load().map_err(DistError::Unavailable)?;
    let host = client.local_ip.to_string();
    gloo::Gloo::connect(
        client.clone(),
        launch.rank,
        launch.world,
        &host,
        iface.as_deref(),
        timeout,
    )
    .map(|g| Box::new(g) as Box<dyn Engine>)
    .map_err(|msg| DistError::Collective {
        engine: "Gloo",
        what: format!(
            "connection of rank {} to the others (listening on {host})",
            launch.rank
        ),
        msg,
        timeout_s: timeout.as_secs(),
    })
}

#[cfg(not(marlin_gloo))]
fn gloo_engine(
    _client: &Arc<store::Client>,
    _launch: &Launch,
    _timeout: Duration,
) -> Result<Box<dyn Engine>, DistError> {
    Err(DistError::Unavailable(
        "this build has no Gloo, the CPU's collectives: install libgloo-dev (Debian/Ubuntu) and \
         rebuild"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn nccl_engine(
    client: &Arc<store::Client>,
    launch: &Launch,
    device: usize,
    timeout: Duration,
) -> Result<Box<dyn Engine>, DistError> {
    nccl::Nccl::connect(client, launch, device, timeout).map(|n| Box::new(n) as Box<dyn Engine>)
}

#[cfg(not(feature = "cuda"))]
fn nccl_engine(
    _client: &Arc<store::Client>,
    _launch: &Launch,
    _device: usize,
    _timeout: Duration,
) -> Result<Box<dyn Engine>, DistError> {
    Err(DistError::Unavailable(
        "NCCL needs a build with --features cuda".into(),
    ))
}
