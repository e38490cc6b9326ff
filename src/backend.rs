//! Run-time choice of the compute device (`--device cpu|cuda[:i]`) over one generic code path.

use burn::tensor::backend::Backend;
use std::str::FromStr;

/// The CPU backend of the default build.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
/// The CUDA backend (`cuda` cargo feature).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
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
}

/// Work that is generic over the backend; [`run_on`] picks the backend at run time.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Run `task` on the backend of `spec`. A CUDA device in a build without the `cuda` feature is
/// an error saying how to get one.
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
    }
}
