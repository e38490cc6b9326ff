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

extern "C" {
    fn marlin_gloo_assign(out: *mut c_void, data: *const c_char, len: usize);
    #[allow(clippy::too_many_arguments)]
    fn marlin_gloo_new(
        rank: c_int,
        size: c_int,
        hostname: *const c_char,
        iface: *const c_char,
        timeout_ms: i64,
        store_ctx: *mut c_void,
        set: SetFn,
        get: GetFn,
        wait: WaitFn,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn marlin_gloo_allreduce_sum_f32(
        g: *mut c_void,
        data: *mut f32,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn marlin_gloo_broadcast_f32(
        g: *mut c_void,
        data: *mut f32,
        n: usize,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn marlin_gloo_barrier(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn marlin_gloo_free(g: *mut c_void);
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
        Ok(Some(v)) => {
            unsafe { marlin_gloo_assign(out, v.as_ptr() as *const c_char, v.len()) };
            0
        }
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
        let host = CString::new(host).map_err(|e| e.to_string())?;
        let iface = CString::new(iface.unwrap_or("")).map_err(|e| e.to_string())?;
        let ctx = Box::new(StoreCtx { client });
        let mut err = [0 as c_char; ERR_LEN];
        // The store context only lives through the rendezvous: Gloo keeps no reference to
        // the store after connectFullMesh returns.
        let ptr = unsafe {
            marlin_gloo_new(
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
        Ok(Self { ptr })
    }
}

impl Engine for Gloo {
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), String> {
        let mut err = [0 as c_char; ERR_LEN];
        let rc = unsafe {
            marlin_gloo_allreduce_sum_f32(
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
            marlin_gloo_broadcast_f32(
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
        let rc = unsafe { marlin_gloo_barrier(self.ptr, err.as_mut_ptr(), ERR_LEN) };
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
        unsafe { marlin_gloo_free(self.ptr) };
    }
}
