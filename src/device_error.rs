//! Failures of the compute device as values. burn's CUDA backend reports an allocation that
//! does not fit, a kernel NVRTC cannot compile or a missing NVRTC library by panicking, with a
//! backtrace; [`guard`] turns that into one line that says what to do.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

/// Why the device could not run a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "out of GPU memory at --batch-size {batch_size}: try --batch-size {} (with several \
         --workers per GPU, fewer workers)",
        (batch_size / 2).max(1)
    )]
    OutOfMemory { batch_size: usize },
    #[error(
        "cannot compile GPU kernels ({0}): burn compiles its CUDA kernels at run time with \
         NVIDIA's NVRTC; install it (the CUDA toolkit's `cuda-nvrtc` package, or `pip install \
         nvidia-cuda-nvrtc-cu12` with its lib/ folder on LD_LIBRARY_PATH)"
    )]
    Compiler(String),
    #[error("the device failed: {0}")]
    Other(String),
}

impl DeviceError {
    /// The error a panic message stands for, for a batch of `batch_size`.
    pub fn classify(message: &str, batch_size: usize) -> Self {
        let m = message.to_ascii_lowercase();
        let first = message
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("unknown error")
            .to_string();
        if m.contains("out of memory")
            || m.contains("out_of_memory")
            || m.contains("outofmemory")
            || m.contains("out-of-memory")
        {
            Self::OutOfMemory { batch_size }
        } else if m.contains("nvrtc") || m.contains("compilation error") {
            Self::Compiler(first)
        } else {
            Self::Other(first)
        }
    }
}

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f`; a panic inside it (the device's way of failing) comes back as a [`DeviceError`]
/// and prints nothing. `batch_size` goes into the out-of-memory advice.
pub fn guard<T>(batch_size: usize, f: impl FnOnce() -> T) -> Result<T, DeviceError> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    r.map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        DeviceError::classify(&msg, batch_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_one_line_errors() {
        // cubecl's launch error text, as the CUDA runtime reports an allocation that fails.
        let oom = guard(64, || -> u32 {
            panic!(
                "An out-of-memory error happened during launch\nCaused by:\n  \
                 CUDA_ERROR_OUT_OF_MEMORY\nBacktrace\n..."
            )
        })
        .unwrap_err();
        assert_eq!(oom, DeviceError::OutOfMemory { batch_size: 64 });
        let line = oom.to_string();
        assert!(line.contains("--batch-size 64") && line.contains("try --batch-size 32"));
        assert!(!line.contains('\n'));

        let nvrtc = guard(8, || -> u32 {
            panic!("Unable to dynamically load the \"nvrtc\" shared library - searched for library names: [\"libnvrtc.so\"]")
        })
        .unwrap_err();
        assert!(matches!(nvrtc, DeviceError::Compiler(_)), "{nvrtc:?}");
        assert!(nvrtc.to_string().contains("install"));

        let other = guard(8, || -> u32 { panic!("invalid device ordinal\nmore") }).unwrap_err();
        assert_eq!(
            other.to_string(),
            "the device failed: invalid device ordinal"
        );

        assert_eq!(guard(8, || 5), Ok(5));
        assert!(DeviceError::OutOfMemory { batch_size: 1 }
            .to_string()
            .contains("try --batch-size 1"));
    }
}
