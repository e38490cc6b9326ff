//! Failures of the compute device as values. burn's CUDA backend reports an allocation that
//! does not fit, a kernel NVRTC cannot compile or a missing NVRTC library by panicking, with a
//! backtrace; [`guard`] turns that into one line that says what to do.
//!
//! On wgpu the failure happens in cubecl's device thread ("can't allocate buffer of size N":
//! a buffer over the device's memory or over its largest binding), and the caller's thread
//! only sees the call fail (`CallError`). While a guard is active, a panic of a cubecl device
//! thread is kept (not printed) and the guard classifies that message instead.

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
            || m.contains("out of gpu memory")
            || m.contains("out_of_memory")
            || m.contains("outofmemory")
            || m.contains("out-of-memory")
            || m.contains("can't allocate buffer")
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

/// Guards running now, in any thread.
static ACTIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// The first panic message of a device thread while a guard was active.
static DEVICE_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// cubecl's device threads (`DSD-<type>-<index>` downstream, `DSU-<type>-<index>` upstream:
/// burn's fusion stream, where an allocation that fails on CUDA first shows as a failed
/// autotune plan and then a cascade of panics) and wgpu's own.
fn is_device_thread() -> bool {
    std::thread::current()
        .name()
        .is_some_and(is_device_thread_name)
}

fn is_device_thread_name(n: &str) -> bool {
    n.starts_with("DSD-") || n.starts_with("DSU-") || n.contains("wgpu")
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Run `f`; a panic inside it (the device's way of failing) comes back as a [`DeviceError`]
/// and prints nothing. `batch_size` goes into the out-of-memory advice.
pub fn guard<T>(batch_size: usize, f: impl FnOnce() -> T) -> Result<T, DeviceError> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            use std::sync::atomic::Ordering::SeqCst;
            if GUARDED.with(Cell::get) {
                return;
            }
            if ACTIVE.load(SeqCst) > 0 && is_device_thread() {
                let mut kept = DEVICE_PANIC.lock().unwrap_or_else(|e| e.into_inner());
                kept.get_or_insert_with(|| payload_text(info.payload()));
                return;
            }
            previous(info);
        }));
    });
    use std::sync::atomic::Ordering::SeqCst;
    ACTIVE.fetch_add(1, SeqCst);
    let was = GUARDED.with(|g| g.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    ACTIVE.fetch_sub(1, SeqCst);
    r.map_err(|payload| {
        let msg = payload_text(payload.as_ref());
        let first = DeviceError::classify(&msg, batch_size);
        let kept = DEVICE_PANIC
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (first, kept) {
            // The caller saw only that the device thread failed: its message says why.
            (DeviceError::Other(_), Some(k)) => DeviceError::classify(&k, batch_size),
            (e, _) => e,
        }
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

        // wgpu: the device thread fails, the caller only sees the call fail.
        let wgpu = guard(16, || -> u32 {
            let t = std::thread::Builder::new()
                .name("DSD-3-0".into())
                .spawn(|| panic!("called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 236027904"))
                .unwrap();
            assert!(t.join().is_err());
            panic!("called `Result::unwrap()` on an `Err` value: CallError")
        })
        .unwrap_err();
        assert_eq!(wgpu, DeviceError::OutOfMemory { batch_size: 16 });

        // CUDA (seen on an H200 at ViT-B batch 8192): the device thread's allocation fails,
        // then burn's fusion thread (`DSU-`) panics on every later call (a failed autotune
        // plan, missing handles); all of it stays quiet and the device thread's reason wins.
        let cuda = guard(8192, || -> u32 {
            for (name, msg) in [
                ("DSD-0-0", "An out-of-memory error happened during allocation: CUDA_ERROR_OUT_OF_MEMORY"),
                ("DSU-0-0", "Can't execute the autotune plan for key: MatmulAutotuneKey { .. } Communication channel with the server is down: CallError"),
                ("DSU-0-0", "Should have handle for tensor TensorId { value: 166 }"),
            ] {
                let t = std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || panic!("{msg}"))
                    .unwrap();
                assert!(t.join().is_err());
            }
            panic!("called `Result::unwrap()` on an `Err` value: RecvError")
        })
        .unwrap_err();
        assert_eq!(cuda, DeviceError::OutOfMemory { batch_size: 8192 });
        assert!(is_device_thread_name("DSU-0-0") && is_device_thread_name("DSD-3-1"));
        assert!(!is_device_thread_name("main"));
        assert!(DeviceError::OutOfMemory { batch_size: 1 }
            .to_string()
            .contains("try --batch-size 1"));
    }
}
