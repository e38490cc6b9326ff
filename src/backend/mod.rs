//! Run-time choice of the compute device (`--device cpu|cuda[:i]|vulkan[:i]|metal`) over one
//! generic code path.

#[cfg(any(feature = "vulkan", feature = "metal"))]
pub mod wgpu;

use crate::kernels::{set_cpu_precision, set_gpu_precision, Precision};
use burn::tensor::backend::Backend;
use std::str::FromStr;

/// The CPU backend of the default build.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
/// The CUDA backend (`cuda` cargo feature).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
/// Vulkan through wgpu, kernels compiled to SPIR-V (`vulkan` cargo feature): any GPU with a
/// Vulkan driver, and Mesa's software lavapipe.
#[cfg(feature = "vulkan")]
pub type Vulkan = burn::backend::Vulkan;
/// Apple GPUs through wgpu, kernels compiled to MSL (`metal` cargo feature).
#[cfg(feature = "metal")]
pub type Metal = burn::backend::Metal;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// The i-th Vulkan adapter in [`wgpu::adapters`]' order (GPUs before software ones).
    Vulkan(usize),
    Metal,
}

impl DeviceSpec {
    /// A GPU (or a software GPU) rather than the CPU backend.
    pub fn is_gpu(self) -> bool {
        self != Self::Cpu
    }
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let index = |rest: &str| rest.parse::<usize>().ok();
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "vulkan" => Ok(Self::Vulkan(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.split_once(':') {
                Some(("cuda", i)) => index(i).map(Self::Cuda),
                Some(("vulkan", i)) => index(i).map(Self::Vulkan),
                _ => None,
            }
            .ok_or_else(|| {
                format!("unknown device '{s}' (expected cpu, cuda[:N], vulkan[:N] or metal)")
            }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Vulkan(i) => write!(f, "vulkan:{i}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

/// One or more devices of one kind: `cpu`, `cuda`, `cuda:N`, `cuda:0,cuda:1`, `cuda:all`,
/// `vulkan[:N]`, `vulkan:0,vulkan:1`, `metal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSet {
    Cpu,
    Cuda(Vec<usize>),
    /// Every GPU the driver sees, counted when the work starts.
    CudaAll,
    Vulkan(Vec<usize>),
    Metal,
}

impl FromStr for DeviceSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cuda:all" {
            return Ok(Self::CudaAll);
        }
        let specs: Vec<DeviceSpec> = s
            .split(',')
            .map(|d| d.trim().parse())
            .collect::<Result<_, _>>()?;
        let ids = |of: fn(&DeviceSpec) -> Option<usize>| -> Result<Vec<usize>, String> {
            let ids: Vec<usize> = specs.iter().filter_map(of).collect();
            if ids.len() != specs.len() {
                return Err(format!("--device {s}: list devices of one kind"));
            }
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != ids.len() {
                return Err(format!("--device {s}: a GPU is listed twice"));
            }
            Ok(ids)
        };
        match specs.as_slice() {
            [DeviceSpec::Cpu] => Ok(Self::Cpu),
            [DeviceSpec::Metal] => Ok(Self::Metal),
            _ if specs.contains(&DeviceSpec::Cpu) => Err(format!(
                "--device {s}: list GPUs only (cuda:0,cuda:1); for several CPU workers use --workers"
            )),
            [DeviceSpec::Vulkan(_), ..] => ids(|d| match d {
                DeviceSpec::Vulkan(i) => Some(*i),
                _ => None,
            })
            .map(Self::Vulkan),
            _ => ids(|d| match d {
                DeviceSpec::Cuda(i) => Some(*i),
                _ => None,
            })
            .map(Self::Cuda),
        }
    }
}

impl std::fmt::Display for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |f: &mut std::fmt::Formatter<'_>, kind: &str, ids: &[usize]| {
            let v: Vec<String> = ids.iter().map(|i| format!("{kind}:{i}")).collect();
            write!(f, "{}", v.join(","))
        };
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::CudaAll => write!(f, "cuda:all"),
            Self::Cuda(ids) => list(f, "cuda", ids),
            Self::Vulkan(ids) => list(f, "vulkan", ids),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSet {
    /// The one device of a command that runs on one.
    pub fn single(&self) -> Result<DeviceSpec, String> {
        match self {
            Self::Cpu => Ok(DeviceSpec::Cpu),
            Self::Metal => Ok(DeviceSpec::Metal),
            Self::Cuda(ids) if ids.len() == 1 => Ok(DeviceSpec::Cuda(ids[0])),
            Self::Vulkan(ids) if ids.len() == 1 => Ok(DeviceSpec::Vulkan(ids[0])),
            _ => Err(format!(
                "--device {self}: this command runs on one device (cpu, cuda[:N], vulkan[:N] or metal)"
            )),
        }
    }

    /// Each of the `n` devices of the set as a [`DeviceSpec`], in the order [`run_on_all`]
    /// hands them to a task (`n` counts `cuda:all`'s GPUs).
    pub fn specs(&self, n: usize) -> Vec<DeviceSpec> {
        match self {
            Self::Cpu => vec![DeviceSpec::Cpu; n],
            Self::Metal => vec![DeviceSpec::Metal; n],
            Self::CudaAll => (0..n).map(DeviceSpec::Cuda).collect(),
            Self::Cuda(ids) => ids.iter().map(|&i| DeviceSpec::Cuda(i)).collect(),
            Self::Vulkan(ids) => ids.iter().map(|&i| DeviceSpec::Vulkan(i)).collect(),
        }
    }

    /// The first device of the set (which sets the precision of the kind).
    pub fn first(&self) -> DeviceSpec {
        match self {
            Self::Cpu => DeviceSpec::Cpu,
            Self::Metal => DeviceSpec::Metal,
            Self::CudaAll => DeviceSpec::Cuda(0),
            Self::Cuda(ids) => DeviceSpec::Cuda(ids.first().copied().unwrap_or(0)),
            Self::Vulkan(ids) => DeviceSpec::Vulkan(ids.first().copied().unwrap_or(0)),
        }
    }
}

/// Work over several devices of one backend; [`run_on_all`] picks the backend at run time.
pub trait MultiDeviceTask {
    type Output;
    fn run<B: Backend>(self, devices: Vec<B::Device>) -> Self::Output;
}

/// Run `task` on every device of `set`. CUDA devices in a build without the `cuda` feature, or
/// on a machine without the driver, are an error saying what to do.
pub fn run_on_all<T: MultiDeviceTask>(set: &DeviceSet, task: T) -> Result<T::Output, BackendError> {
    match set {
        DeviceSet::Cpu => Ok(task.run::<Cpu>(vec![Default::default()])),
        #[cfg(feature = "cuda")]
        DeviceSet::Cuda(_) | DeviceSet::CudaAll => {
            cuda_driver()?;
            let ids = match set {
                DeviceSet::Cuda(ids) => ids.clone(),
                _ => (0..cuda_device_count()?).collect(),
            };
            if ids.is_empty() {
                return Err(BackendError::NoDriver("the driver sees no GPU".into()));
            }
            Ok(task.run::<Gpu>(
                ids.into_iter()
                    .map(burn::backend::cuda::CudaDevice::new)
                    .collect(),
            ))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSet::Cuda(_) | DeviceSet::CudaAll => Err(BackendError::NoCudaBuild),
        #[cfg(feature = "vulkan")]
        DeviceSet::Vulkan(ids) => {
            let devices = ids
                .iter()
                .map(|&i| wgpu::device(wgpu::Api::Vulkan, i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(task.run::<Vulkan>(devices))
        }
        #[cfg(not(feature = "vulkan"))]
        DeviceSet::Vulkan(_) => Err(BackendError::NotBuilt("vulkan")),
        #[cfg(feature = "metal")]
        DeviceSet::Metal => Ok(task.run::<Metal>(vec![wgpu::device(wgpu::Api::Metal, 0)?])),
        #[cfg(not(feature = "metal"))]
        DeviceSet::Metal => Err(BackendError::NotBuilt("metal")),
    }
}

/// How many GPUs the driver sees (`cuInit`, `cuDeviceGetCount` from libcuda).
#[cfg(feature = "cuda")]
fn cuda_device_count() -> Result<usize, BackendError> {
    let fail = |e: String| BackendError::NoDriver(e);
    // SAFETY: the driver's documented C entry points, called with valid arguments; the library
    // stays loaded for the calls.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1")
            .or_else(|_| libloading::Library::new("libcuda.so"))
            .map_err(|e| fail(e.to_string()))?;
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> i32> =
            lib.get(b"cuInit").map_err(|e| fail(e.to_string()))?;
        let count: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> = lib
            .get(b"cuDeviceGetCount")
            .map_err(|e| fail(e.to_string()))?;
        if init(0) != 0 {
            return Err(fail("cuInit failed".into()));
        }
        let mut n = 0i32;
        if count(&mut n) != 0 {
            return Err(fail("cuDeviceGetCount failed".into()));
        }
        Ok(n.max(0) as usize)
    }
}

/// Bytes in use on GPU `index` right now, device-wide (NVML's count: every process, the
/// CUDA context, memory pools), or `None` without NVML or a `cuda` build. NVML numbers GPUs
/// in PCI order, as `nvidia-smi`; set `CUDA_DEVICE_ORDER=PCI_BUS_ID` for CUDA to agree.
pub fn gpu_memory_used(index: usize) -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        nvml_memory_used(index)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = index;
        None
    }
}

#[cfg(feature = "cuda")]
fn nvml_memory_used(index: usize) -> Option<u64> {
    #[repr(C)]
    struct Memory {
        total: u64,
        free: u64,
        used: u64,
    }
    type Device = *mut std::ffi::c_void;
    // SAFETY: NVML's documented C entry points (nvml.h), called with valid pointers to
    // locals of the documented layouts; the library stays loaded for the calls (and for the
    // process: NVML is initialised once and never shut down).
    unsafe {
        static LIB: std::sync::OnceLock<Option<libloading::Library>> = std::sync::OnceLock::new();
        let lib = LIB
            .get_or_init(|| {
                let lib = libloading::Library::new("libnvidia-ml.so.1")
                    .or_else(|_| libloading::Library::new("libnvidia-ml.so"))
                    .ok()?;
                let init: libloading::Symbol<unsafe extern "C" fn() -> i32> =
                    lib.get(b"nvmlInit_v2").ok()?;
                (init() == 0).then_some(())?;
                Some(lib)
            })
            .as_ref()?;
        let handle: libloading::Symbol<unsafe extern "C" fn(u32, *mut Device) -> i32> =
            lib.get(b"nvmlDeviceGetHandleByIndex_v2").ok()?;
        let info: libloading::Symbol<unsafe extern "C" fn(Device, *mut Memory) -> i32> =
            lib.get(b"nvmlDeviceGetMemoryInfo").ok()?;
        let mut dev: Device = std::ptr::null_mut();
        if handle(index as u32, &mut dev) != 0 {
            return None;
        }
        let mut m = Memory {
            total: 0,
            free: 0,
            used: 0,
        };
        (info(dev, &mut m) == 0).then_some(m.used)
    }
}

/// The most GPU memory in use while it runs: a thread reads [`gpu_memory_used`] every 5 ms.
pub struct MemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
    /// In use when the watch started.
    pub start: u64,
}

impl MemoryWatch {
    /// Start watching GPU `index`; `None` when its memory cannot be read.
    pub fn start(index: usize) -> Option<Self> {
        let start = gpu_memory_used(index)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = start;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(gpu_memory_used(index).unwrap_or(0));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        });
        Some(Self {
            stop,
            thread: Some(thread),
            start,
        })
    }

    /// The peak seen since [`MemoryWatch::start`] (bytes, device-wide).
    pub fn peak(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(self.start)
    }
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error(
        "this marlin was built without CUDA: rebuild with `cargo build --release --features cuda`"
    )]
    NoCudaBuild,
    #[error("--device cuda: no NVIDIA driver on this machine ({0}); install the driver or use --device cpu")]
    NoDriver(String),
    #[error(
        "this marlin was built without {0}: rebuild with `cargo build --release --features {0}`"
    )]
    NotBuilt(&'static str),
    /// A Vulkan or Metal adapter that is not there (the message names those that are, and
    /// what to install).
    #[error("{0}")]
    NoAdapter(String),
}

/// Work that is generic over the backend; [`run_on`] picks the backend at run time.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Run `task` on the backend of `spec`. A GPU kind this build lacks is an error saying how to
/// get it; a Vulkan or Metal adapter that is not there, one naming those that are.
pub fn run_on<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<T::Output, BackendError> {
    match spec {
        DeviceSpec::Cpu => Ok(task.run::<Cpu>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            cuda_driver()?;
            Ok(task.run::<Gpu>(burn::backend::cuda::CudaDevice::new(i)))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => Err(BackendError::NoCudaBuild),
        #[cfg(feature = "vulkan")]
        DeviceSpec::Vulkan(i) => Ok(task.run::<Vulkan>(wgpu::device(wgpu::Api::Vulkan, i)?)),
        #[cfg(not(feature = "vulkan"))]
        DeviceSpec::Vulkan(_) => Err(BackendError::NotBuilt("vulkan")),
        #[cfg(feature = "metal")]
        DeviceSpec::Metal => Ok(task.run::<Metal>(wgpu::device(wgpu::Api::Metal, 0)?)),
        #[cfg(not(feature = "metal"))]
        DeviceSpec::Metal => Err(BackendError::NotBuilt("metal")),
    }
}

/// Set the precision of the kernels of `device` (the CPU's or the GPU's); `None` takes
/// [`Precision::default_for`] that device. Returns the precision in effect and, when it is not
/// the one asked for, a one-line note.
pub fn set_precision(p: Option<Precision>, device: DeviceSpec) -> (Precision, Option<String>) {
    match device {
        DeviceSpec::Cpu => set_cpu_precision(p.unwrap_or(Precision::F32)),
        DeviceSpec::Cuda(_) => {
            let p = p.unwrap_or(Precision::default_for(true));
            set_gpu_precision(p);
            (p, None)
        }
        // Vulkan and Metal shaders have no TF32: f32 by default, bf16 where the adapter has
        // bf16 arithmetic.
        DeviceSpec::Vulkan(_) | DeviceSpec::Metal => {
            let (effective, note) = match p.unwrap_or(Precision::F32) {
                Precision::Tf32 => (
                    Precision::F32,
                    Some(format!(
                        "TF32 is a CUDA format: computing in f32 on --device {device}"
                    )),
                ),
                Precision::Bf16 if supports_bf16(device) == Some(false) => (
                    Precision::F32,
                    Some(format!(
                        "--device {device} has no bf16 shader arithmetic: computing in f32 instead"
                    )),
                ),
                p => (p, None),
            };
            set_gpu_precision(effective);
            (effective, note)
        }
    }
}
/// Whether `spec` computes in bf16 (storage, conversion, arithmetic and dot products):
/// `None` when that cannot be known (the device does not open, or its kind is not built).
pub fn supports_bf16(spec: DeviceSpec) -> Option<bool> {
    fn ask<B: Backend>(device: B::Device) -> bool {
        B::supports_dtype(&device, burn::tensor::DType::BF16)
    }
    match spec {
        DeviceSpec::Cpu => Some(crate::kernels::bf16::supported()),
        // Every CUDA GPU burn runs on stores and converts bf16; tensor cores make it fast.
        DeviceSpec::Cuda(_) => Some(true),
        #[cfg(feature = "vulkan")]
        DeviceSpec::Vulkan(i) => wgpu::device(wgpu::Api::Vulkan, i).ok().map(ask::<Vulkan>),
        #[cfg(feature = "metal")]
        DeviceSpec::Metal => wgpu::device(wgpu::Api::Metal, 0).ok().map(ask::<Metal>),
        #[allow(unreachable_patterns)]
        _ => {
            let _ = ask::<Cpu>;
            None
        }
    }
}

/// The NVIDIA driver library must load before the CUDA backend starts: without it the runtime
/// panics in a worker thread. One line instead.
#[cfg(feature = "cuda")]
fn cuda_driver() -> Result<(), BackendError> {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    let mut first = None;
    for &name in names {
        // SAFETY: loading the driver runs its initialisers, as the CUDA runtime would a moment
        // later; nothing from the library is called here.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => {
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                first.get_or_insert(why);
            }
        }
    }
    Err(BackendError::NoDriver(first.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("tpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("unknown device 'tpu'"));
        assert_eq!("vulkan".parse::<DeviceSpec>(), Ok(DeviceSpec::Vulkan(0)));
        assert_eq!("vulkan:2".parse::<DeviceSpec>(), Ok(DeviceSpec::Vulkan(2)));
        assert_eq!("metal".parse::<DeviceSpec>(), Ok(DeviceSpec::Metal));
        assert!("vulkan:x".parse::<DeviceSpec>().is_err());
        assert_eq!(
            "vulkan:0,vulkan:1".parse::<DeviceSet>(),
            Ok(DeviceSet::Vulkan(vec![0, 1]))
        );
        assert!("vulkan:0,cuda:1"
            .parse::<DeviceSet>()
            .unwrap_err()
            .contains("one kind"));
        assert_eq!(DeviceSet::Metal.single(), Ok(DeviceSpec::Metal));
        assert_eq!(DeviceSet::Vulkan(vec![1]).first(), DeviceSpec::Vulkan(1));
        assert_eq!("cpu".parse::<DeviceSet>(), Ok(DeviceSet::Cpu));
        assert_eq!(
            "cuda:0,cuda:2".parse::<DeviceSet>(),
            Ok(DeviceSet::Cuda(vec![0, 2]))
        );
        assert_eq!("cuda:all".parse::<DeviceSet>(), Ok(DeviceSet::CudaAll));
        assert!("cpu,cuda:1"
            .parse::<DeviceSet>()
            .unwrap_err()
            .contains("--workers"));
        assert!("cuda:1,cuda:1"
            .parse::<DeviceSet>()
            .unwrap_err()
            .contains("twice"));
        assert!(DeviceSet::Cuda(vec![0, 1])
            .single()
            .unwrap_err()
            .contains("one device"));
        assert_eq!(DeviceSet::Cuda(vec![3]).single(), Ok(DeviceSpec::Cuda(3)));
    }
}
