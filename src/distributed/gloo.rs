//! Gloo on the CPU (the engine torch's DDP uses there) through the C ABI of `gloo.cc`: a full
//! mesh of TCP pairs, met through the store, and its all-reduce, broadcast and barrier.

use super::store::Client;
use super::Engine;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;
use std::time::Duration;

type SetFn = extern "C" fn(*mut c_void, *const c_char, *const c_char, usize) -> c_int;
type GetFn = extern "C" fn(*mut c_void, *const c_char, *mut c_void, i64) -> c_int;
type WaitFn = extern "C" fn(*mut c_void, *const c_char, i64) -> c_int;

type AssignFn = unsafe extern "C" fn(*mut c_void, *const c_char, usize);
type NewFn = unsafe extern "C" fn(
    c_int,
    c_int,
    *const c_char,
    *const c_char,
    i64,
    *mut c_void,
    SetFn,
    GetFn,
    WaitFn,
    *mut c_char,
    usize,
) -> *mut c_void;
type AllReduceFn = unsafe extern "C" fn(*mut c_void, *mut f32, usize, *mut c_char, usize) -> c_int;
type BroadcastFn =
    unsafe extern "C" fn(*mut c_void, *mut f32, usize, c_int, *mut c_char, usize) -> c_int;
type BarrierFn = unsafe extern "C" fn(*mut c_void, *mut c_char, usize) -> c_int;
type FreeFn = unsafe extern "C" fn(*mut c_void);

/// The shim (`gloo.cc`, built by build.rs into a shared object linked to libgloo), carried in
/// the binary and opened on first use: the binary starts where libgloo is not installed, and
/// only a multi-process launch on the CPU asks for it.
static SHIM: &[u8] = include_bytes!(env!("MARLIN_GLOO_SHIM"));

/// The shim's entry points (its C ABI), resolved once.
struct Api {
    assign: AssignFn,
    new: NewFn,
    all_reduce_sum_f32: AllReduceFn,
    broadcast_f32: BroadcastFn,
    barrier: BarrierFn,
    free: FreeFn,
    /// Kept open for the process's life (the functions above point into it).
    _lib: libloading::Library,
}

/// Whether Gloo can be used here: the shim and the libgloo it links are opened (once); the
/// error says what to install.
pub fn load() -> Result<(), String> {
    api().map(|_| ())
}

/// The shim, opened on the first call; the error says what to install.
fn api() -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
    API.get_or_init(open).as_ref().map_err(Clone::clone)
}

fn open() -> Result<Api, String> {
    let lib = open_shim().map_err(|e| {
        format!(
            "Gloo, the CPU's collectives, cannot be loaded ({e}): install libgloo0 \
             (Debian/Ubuntu: apt-get install libgloo0) or put the folder of its libgloo.so.0 on \
             LD_LIBRARY_PATH"
        )
    })?;
    // SAFETY: the symbols are the shim's `extern "C"` functions, with exactly these
    // signatures (gloo.cc); the library stays open as long as the Api holds it.
    unsafe {
        Ok(Api {
            assign: *lib
                .get::<AssignFn>(b"marlin_gloo_assign\0")
                .map_err(|e| e.to_string())?,
            new: *lib
                .get::<NewFn>(b"marlin_gloo_new\0")
                .map_err(|e| e.to_string())?,
            all_reduce_sum_f32: *lib
                .get::<AllReduceFn>(b"marlin_gloo_allreduce_sum_f32\0")
                .map_err(|e| e.to_string())?,
            broadcast_f32: *lib
                .get::<BroadcastFn>(b"marlin_gloo_broadcast_f32\0")
                .map_err(|e| e.to_string())?,
            barrier: *lib
                .get::<BarrierFn>(b"marlin_gloo_barrier\0")
                .map_err(|e| e.to_string())?,
            free: *lib
                .get::<FreeFn>(b"marlin_gloo_free\0")
                .map_err(|e| e.to_string())?,
            _lib: lib,
        })
    }
}

/// Opens the carried shim from an anonymous in-memory file (Linux: nothing is written to
/// disk, and a `noexec` /tmp does not matter), else from a file in the temporary folder,
/// removed once open.
fn open_shim() -> Result<libloading::Library, String> {
    #[cfg(target_os = "linux")]
    {
        use std::io::Write;
        if let Ok(fd) = rustix::fs::memfd_create("marlin-gloo", rustix::fs::MemfdFlags::CLOEXEC) {
            let mut file = std::fs::File::from(fd);
            if file.write_all(SHIM).is_ok() {
                let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
                // SAFETY: the shim's initialisers are libstdc++'s and Gloo's, which run no
                // code of ours and have no preconditions.
                let lib = unsafe { libloading::Library::new(&path) };
                // The mapping outlives the descriptor.
                drop(file);
                return lib.map_err(|e| describe(&e));
            }
        }
    }
    let path = std::env::temp_dir().join(format!(
        "marlin-gloo-{}-{}.so",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::write(&path, SHIM).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: as above.
    let lib = unsafe { libloading::Library::new(&path) };
    let _ = std::fs::remove_file(&path);
    lib.map_err(|e| describe(&e))
}

/// The loader's own words (libloading's error only says "dlopen failed"; its source names the
/// library that is missing).
fn describe(e: &libloading::Error) -> String {
    use std::error::Error;
    e.source().map_or_else(|| e.to_string(), |s| s.to_string())
}

/// What the store callbacks see: the client and the prefix of Gloo's keys.
struct StoreCtx {
    client: Arc<Client>,
}

fn key_of(key: *const c_char) -> String {
    // Gloo passes a NUL-terminated std::string's c_str().
    let k = unsafe { CStr::from_ptr(key) }.to_string_lossy();
    format!("gloo/{k}")
}

extern "C" fn store_set(
    ctx: *mut c_void,
    key: *const c_char,
    data: *const c_char,
    len: usize,
) -> c_int {
    let ctx = unsafe { &*(ctx as *const StoreCtx) };
    let value = unsafe { std::slice::from_raw_parts(data as *const u8, len) };
    match ctx.client.set(&key_of(key), value) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

extern "C" fn store_get(
    ctx: *mut c_void,
    key: *const c_char,
    out: *mut c_void,
    timeout_ms: i64,
) -> c_int {
    let ctx = unsafe { &*(ctx as *const StoreCtx) };
    let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
    match ctx.client.get(&key_of(key), timeout) {
        Ok(Some(v)) => match api() {
            Ok(api) => {
                // SAFETY: `out` is the std::vector<char>* the shim passed for this call.
                unsafe { (api.assign)(out, v.as_ptr() as *const c_char, v.len()) };
                0
            }
            Err(_) => 1,
        },
        _ => 1,
    }
}

extern "C" fn store_wait(ctx: *mut c_void, key: *const c_char, timeout_ms: i64) -> c_int {
    let ctx = unsafe { &*(ctx as *const StoreCtx) };
    let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
    match ctx.client.get(&key_of(key), timeout) {
        Ok(Some(_)) => 0,
        _ => 1,
    }
}

const ERR_LEN: usize = 1024;

fn message(buf: &[c_char; ERR_LEN]) -> String {
    // The shim always NUL-terminates within the buffer.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string()
}

/// A connected Gloo group.
pub struct Gloo {
    ptr: *mut c_void,
    api: &'static Api,
}

// The group is used by one thread at a time (the engine sits behind the group's mutex).
unsafe impl Send for Gloo {}

impl Gloo {
    /// Meet the other ranks through `client` and connect a full mesh. This rank listens on
    /// `iface` when given (GLOO_SOCKET_IFNAME), else on `host`.
    pub fn connect(
        client: Arc<Client>,
        rank: usize,
        world: usize,
        host: &str,
        iface: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let api = api()?;
        let host = CString::new(host).map_err(|e| e.to_string())?;
        let iface = CString::new(iface.unwrap_or("")).map_err(|e| e.to_string())?;
        let ctx = Box::new(StoreCtx { client });
        let mut err = [0 as c_char; ERR_LEN];
        // The store context only lives through the rendezvous: Gloo keeps no reference to
        // the store after connectFullMesh returns.
        let ptr = unsafe {
            (api.new)(
                rank as c_int,
                world as c_int,
                host.as_ptr(),
                iface.as_ptr(),
                timeout.as_millis() as i64,
                &*ctx as *const StoreCtx as *mut c_void,
                store_set,
                store_get,
                store_wait,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        drop(ctx);
        if ptr.is_null() {
            return Err(message(&err));
        }
        Ok(Self { ptr, api })
    }
}

impl Engine for Gloo {
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), String> {
        let mut err = [0 as c_char; ERR_LEN];
        let rc = unsafe {
            (self.api.all_reduce_sum_f32)(
                self.ptr,
                data.as_mut_ptr(),
                data.len(),
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(message(&err))
        }
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), String> {
        let mut err = [0 as c_char; ERR_LEN];
        let rc = unsafe {
            (self.api.broadcast_f32)(
                self.ptr,
                data.as_mut_ptr(),
                data.len(),
                root as c_int,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(message(&err))
        }
    }

    fn barrier(&mut self) -> Result<(), String> {
        let mut err = [0 as c_char; ERR_LEN];
        let rc = unsafe { (self.api.barrier)(self.ptr, err.as_mut_ptr(), ERR_LEN) };
        if rc == 0 {
            Ok(())
        } else {
            Err(message(&err))
        }
    }

    fn name(&self) -> &'static str {
        "Gloo"
    }
}

impl Drop for Gloo {
    fn drop(&mut self) {
        unsafe { (self.api.free)(self.ptr) };
    }
}
