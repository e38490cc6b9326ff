#!/usr/bin/env python3
"""Compile-check, test and time the CUDA encoder engine's kernels (src/kernels/cuda/*.cu).

Two modes:

  --compile-only   Compiles every .cu file with NVRTC (through ctypes; no GPU, no CuPy, no numpy
                   needed) for the architectures the Rust side and CI use: encoder.cu for sm_70,
                   sm_75, sm_80 and sm_90a; attention_simt.cu for sm_70, sm_80 and sm_90a with
                   several -DHEAD_DIM; attention_mma.cu for sm_80 and sm_90a with -DHEAD_DIM in
                   {16, 32, 64, 80, 128}. Fails on any compile error, any warning in the NVRTC
                   log, or a kernel missing from the cubin; prints registers, shared memory and
                   spills per kernel (from ptxas -v).

  default          On a GPU machine with CuPy and numpy (PyTorch optional): compiles each file
                   with NVRTC using exactly the Rust side's options (--gpu-architecture=sm_XY,
                   sm_90a on Hopper; --std=c++17; -DHEAD_DIM=k for the attention files; no fast
                   math), loads the cubin with cupy.RawModule, and for every kernel: runs it on
                   fresh random inputs against a float64 numpy reference (max abs diff and
                   relative error |out-ref|/|ref| against a tolerance: f32 1e-5, tf32 2e-3, bf16
                   1e-2, exact for the patchify copy), with outputs poisoned with NaN before each
                   run and guard zones around every output (a NaN left in the output, or a write
                   outside it, fails); then times it (CUDA events, median of 30 runs after
                   warm-up) at ViT-B shapes (batch 8, 1568 tokens, width 768, 12 heads of 64,
                   MLP 3072, clips 3x16x224x224, tubelet 2, patch 16) in GB/s or TFLOP/s, and the
                   attention kernels against torch.nn.functional.scaled_dot_product_attention
                   when torch is present.

NVRTC is found from $MARLIN_NVRTC (the library or its folder), then site-packages/nvidia/**/
(pip's nvidia-cuda-nvrtc-cu12), then the dynamic loader, then /usr/local/cuda*/.

Exit status: 0 when every check passes, 1 when one fails, 2 when the tools are missing.
"""

import argparse
import concurrent.futures
import ctypes
import glob
import math
import os
import re
import site
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCES = REPO / "src" / "kernels" / "cuda"

ENCODER_KERNELS = [
    "patchify_f32", "patchify_bf16", "layer_norm_f32", "layer_norm_bf16",
    "add_position_layer_norm_f32", "add_position_layer_norm_bf16", "gelu_f32", "gelu_bf16",
    "mean_layer_norm",
]
SIMT_KERNELS = ["attention_simt_f32", "attention_simt_bf16"]
MMA_KERNELS = ["attention_mma_bf16", "attention_mma_tf32"]
TRAIN_KERNELS = [
    "fill_f32", "gather_rows_f32", "scatter_add_rows_f32", "col_sum_f32", "layer_norm_fwd_f32",
    "layer_norm_bwd_f32", "gelu_fwd_f32", "gelu_bwd_f32", "leaky_relu_f32", "leaky_relu_bwd_f32",
    "sq_diff_sum_f32", "sum_f32", "store_scaled_f32", "adamw_f32", "attention_delta_f32",
    "fill_bf16", "convert_f32_bf16", "convert_bf16_f32", "col_sum_bf16", "layer_norm_fwd_bf16",
    "gelu_fwd_bf16", "gelu_bwd_bf16", "attention_delta_bf16",
] + [f"attention_{k}_{t}_hd{w}" for t in ("f32", "bf16") for w in (32, 64, 128)
     for k in ("fwd", "bwd_dq", "bwd_dkv")]

# file -> (kernels, compile-only architectures, compile-only head dims or None)
FILES = {
    "encoder.cu": (ENCODER_KERNELS, ["sm_70", "sm_75", "sm_80", "sm_90a"], None),
    "attention_simt.cu": (SIMT_KERNELS, ["sm_70", "sm_80", "sm_90a"],
                          [1, 4, 7, 8, 16, 32, 64, 80, 128, 256]),
    "attention_mma.cu": (MMA_KERNELS, ["sm_80", "sm_90a"], [16, 32, 64, 80, 128]),
    "train.cu": (TRAIN_KERNELS, ["sm_70", "sm_80", "sm_90a"], None),
}

# NVRTC 12.x prints this for sm_70/sm_72 whatever the source; it is not a warning about the code.
TOOLCHAIN_NOTICES = [re.compile(r"Architectures prior to .* are deprecated")]

TOL_F32, TOL_TF32, TOL_BF16 = 1e-5, 2e-3, 1e-2


def rust_options(arch, head_dim=None):
    """The NVRTC options of the Rust side (src/kernels/cuda): no fast math, no include path."""
    opts = [f"--gpu-architecture={arch}", "--std=c++17"]
    if head_dim is not None:
        opts.append(f"-DHEAD_DIM={head_dim}")
    return opts


# ================================================================================================
# NVRTC through ctypes
# ================================================================================================

def _nvrtc_candidates():
    env = os.environ.get("MARLIN_NVRTC")
    if env:
        p = Path(env)
        if p.is_dir():
            yield from sorted(glob.glob(str(p / "libnvrtc.so*")), reverse=True)
        else:
            yield str(p)
    roots = []
    try:
        roots += site.getsitepackages()
    except Exception:
        pass
    try:
        roots.append(site.getusersitepackages())
    except Exception:
        pass
    roots += [p for p in sys.path if p.endswith("site-packages") or p.endswith("dist-packages")]
    seen = set()
    pat = re.compile(r"^libnvrtc\.so(\.\d+)*$")  # not libnvrtc-builtins, not libnvrtc.alt
    for root in roots:
        if root in seen or not os.path.isdir(root):
            continue
        seen.add(root)
        hits = [h for h in glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"),
                                     recursive=True) if pat.match(os.path.basename(h))]
        # cu12 before newer/older layouts, longest version suffix first
        yield from sorted(hits, key=lambda h: ("cuda_nvrtc" not in h, -len(h)))
    yield "libnvrtc.so.12"
    yield "libnvrtc.so"
    for d in sorted(glob.glob("/usr/local/cuda*/lib64"), reverse=True):
        yield from sorted(glob.glob(os.path.join(d, "libnvrtc.so*")), reverse=True)


class Nvrtc:
    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        c = ctypes
        lib.nvrtcVersion.argtypes = [c.POINTER(c.c_int), c.POINTER(c.c_int)]
        lib.nvrtcCreateProgram.argtypes = [c.POINTER(c.c_void_p), c.c_char_p, c.c_char_p, c.c_int,
                                           c.c_void_p, c.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [c.c_void_p, c.c_int, c.POINTER(c.c_char_p)]
        lib.nvrtcDestroyProgram.argtypes = [c.POINTER(c.c_void_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [c.c_void_p, c.POINTER(c.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [c.c_void_p, c.c_char_p]
        lib.nvrtcGetCUBINSize.argtypes = [c.c_void_p, c.POINTER(c.c_size_t)]
        lib.nvrtcGetCUBIN.argtypes = [c.c_void_p, c.c_char_p]
        lib.nvrtcGetErrorString.restype = c.c_char_p
        lib.nvrtcGetErrorString.argtypes = [c.c_int]
        for f in ("nvrtcVersion", "nvrtcCreateProgram", "nvrtcCompileProgram", "nvrtcDestroyProgram",
                  "nvrtcGetProgramLogSize", "nvrtcGetProgramLog", "nvrtcGetCUBINSize",
                  "nvrtcGetCUBIN"):
            getattr(lib, f).restype = c.c_int
        self.lib = lib
        ma, mi = c.c_int(), c.c_int()
        lib.nvrtcVersion(c.byref(ma), c.byref(mi))
        self.version = (ma.value, mi.value)
        self.archs = None
        try:
            n = c.c_int()
            lib.nvrtcGetNumSupportedArchs.argtypes = [c.POINTER(c.c_int)]
            if lib.nvrtcGetNumSupportedArchs(c.byref(n)) == 0:
                arr = (c.c_int * n.value)()
                if lib.nvrtcGetSupportedArchs(arr) == 0:
                    self.archs = list(arr)
        except AttributeError:
            pass

    @staticmethod
    def load():
        errors = []
        for cand in _nvrtc_candidates():
            try:
                return Nvrtc(cand)
            except OSError as e:
                errors.append(f"{cand}: {e}")
        raise RuntimeError("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set "
                           "MARLIN_NVRTC)\n  " + "\n  ".join(errors[-4:]))

    def compile(self, source, name, options):
        """Returns (ok, log, cubin bytes or None, error string)."""
        c = ctypes
        prog = c.c_void_p()
        rc = self.lib.nvrtcCreateProgram(c.byref(prog), source, name.encode(), 0, None, None)
        if rc != 0:
            return False, "", None, self.lib.nvrtcGetErrorString(rc).decode()
        try:
            opts = [o.encode() for o in options]
            arr = (c.c_char_p * len(opts))(*opts)
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = c.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, c.byref(size))
            buf = c.create_string_buffer(size.value + 1)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                return False, log, None, self.lib.nvrtcGetErrorString(rc).decode()
            self.lib.nvrtcGetCUBINSize(prog, c.byref(size))
            cub = c.create_string_buffer(size.value)
            if size.value == 0 or self.lib.nvrtcGetCUBIN(prog, cub) != 0:
                return False, log, None, "no cubin (is the architecture a real sm_XY?)"
            return True, log, cub.raw, ""
        finally:
            self.lib.nvrtcDestroyProgram(c.byref(prog))


def split_log(log):
    """(problems, notices, ptxas info lines) of an NVRTC log."""
    problems, notices, info = [], [], []
    for line in log.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("ptxas info") or s.startswith("ptxas         ."):
            info.append(s)
        elif any(p.search(s) for p in TOOLCHAIN_NOTICES):
            notices.append(s)
        else:
            problems.append(s)  # any other line is an error or a warning
    return problems, notices, info


def parse_ptxas(info):
    """{kernel: dict(regs, smem, spill_st, spill_ld, stack)} from ptxas -v lines."""
    out, cur = {}, None
    for s in info:
        m = re.search(r"Compiling entry function '([^']+)'", s)
        if m:
            cur = m.group(1)
            out[cur] = dict(regs=0, smem=0, spill_st=0, spill_ld=0, stack=0)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", s)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", s)
        if m:
            out[cur]["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", s)
            out[cur]["smem"] = int(m2.group(1)) if m2 else 0
    return out


def wanted(kernel, only):
    return only is None or only in kernel


# ================================================================================================
# --compile-only
# ================================================================================================

def compile_only(nvrtc, srcdir, only, head_dims_override, jobs):
    work = []
    for fname, (kernels, archs, hds) in FILES.items():
        if not any(wanted(k, only) for k in kernels):
            continue
        path = srcdir / fname
        if not path.is_file():
            print(f"MISSING {path}")
            work.append((fname, None, None, kernels))
            continue
        if hds is not None and head_dims_override:
            hds = [h for h in head_dims_override
                   if fname != "attention_mma.cu" or (h % 16 == 0 and 16 <= h <= 128)]
        for arch in archs:
            for hd in (hds if hds is not None else [None]):
                work.append((fname, arch, hd, kernels))

    def run(item):
        fname, arch, hd, kernels = item
        if arch is None:
            return item, False, ["file missing"], [], {}, 0.0
        src = (srcdir / fname).read_bytes()
        t0 = time.time()
        opts = rust_options(arch, hd)
        ok, log, cubin, err = nvrtc.compile(src, fname, opts + ["--ptxas-options=-v"])
        if not ok and err == "NVRTC_ERROR_INVALID_OPTION":  # an NVRTC without --ptxas-options
            ok, log, cubin, err = nvrtc.compile(src, fname, opts)
        dt = time.time() - t0
        problems, notices, info = split_log(log)
        if not ok:
            problems.insert(0, f"compile failed: {err}")
        if ok and cubin is not None:
            for k in kernels:
                if (b"\0" + k.encode() + b"\0") not in cubin:
                    problems.append(f"kernel {k} not found in the cubin")
        if re.search(r"^\s*#\s*include", src.decode(errors="replace"), re.M):
            problems.append("the source has an #include (NVRTC may lack the headers)")
        return item, ok and not problems, problems, notices, parse_ptxas(info), dt

    print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} ({nvrtc.path})")
    print(f"sources: {srcdir}")
    failures, notices_seen = 0, set()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(run, work))
    print(f"\n{'file':<20} {'arch':<7} {'HD':>4} {'result':<6} {'time':>6}  kernels: regs/smem bytes/spill bytes")
    for (fname, arch, hd, kernels), ok, problems, notices, res, dt in results:
        notices_seen.update(notices)
        resstr = "  ".join(
            f"{k.replace('attention_', 'att_')}:{r['regs']}/{r['smem']}"
            + (f"/SPILL{r['spill_st']}" if r["spill_st"] or r["spill_ld"] else "")
            for k, r in sorted(res.items()) if wanted(k, only))
        print(f"{fname:<20} {arch or '-':<7} {hd if hd is not None else '-':>4} "
              f"{'ok' if ok else 'FAIL':<6} {dt:5.1f}s  {resstr}")
        for p in problems:
            print(f"    {p}")
        failures += 0 if ok else 1
    for n in sorted(notices_seen):
        print(f"toolchain notice (not from the sources, not counted): {n}")
    total = len(results)
    print(f"\n{total - failures}/{total} compilations clean (errors and warnings counted), "
          f"{failures} failed")
    return 1 if failures else 0


# ================================================================================================
# GPU mode
# ================================================================================================

def gpu_mode(nvrtc, srcdir, only, quick, iters):
    try:
        import numpy as np
        import cupy as cp
    except ImportError as e:
        print(f"the GPU mode needs numpy and CuPy ({e}); use --compile-only on a machine without")
        return 2
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            torch = None
    except Exception:
        torch = None

    dev = cp.cuda.Device()
    cc = int(dev.compute_capability)
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    if nvrtc is not None and nvrtc.archs and cc not in nvrtc.archs:
        best = max(a for a in nvrtc.archs if a <= cc)
        print(f"NVRTC {nvrtc.version} does not know sm_{cc}; compiling for sm_{best}")
        arch = f"sm_{best}"
    print(f"device: {gpu_name} (sm_{cc}), kernels compiled for {arch}")
    if nvrtc is not None:
        print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} ({nvrtc.path}); CuPy {cp.__version__}"
              + (f"; torch {torch.__version__}" if torch else "; no torch"))
    else:
        print("NVRTC not found through ctypes: falling back to cupy.RawModule(code=...), which "
              "adds -ftz=true and its own -arch (NOT the Rust options)")
    rng = np.random.default_rng(20240611)
    results = []     # (kernel, case, max_abs, rel, tol, ok, note)
    timings = []     # (kernel, shape, ms, value, unit)

    # ---- modules --------------------------------------------------------------------------
    modules = {}

    def need_modules(specs):
        todo = [s for s in specs if s not in modules]

        def build(spec):
            fname, hd = spec
            src = (srcdir / fname).read_bytes()
            if nvrtc is None:
                return spec, None, None, ""
            ok, log, cubin, err = nvrtc.compile(src, fname, rust_options(arch, hd))
            problems, _, _ = split_log(log)
            return spec, ok, cubin, (err + "\n" + "\n".join(problems)).strip()

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as ex:
            for spec, ok, cubin, msg in ex.map(build, todo):
                fname, hd = spec
                if nvrtc is None:
                    opts = tuple(o for o in rust_options(arch, hd) if "gpu-architecture" not in o)
                    modules[spec] = cp.RawModule(code=(srcdir / fname).read_text(), options=opts,
                                                 backend="nvrtc")
                    continue
                if not ok:
                    print(f"COMPILE FAIL {fname} HEAD_DIM={hd}: {msg}")
                    modules[spec] = None
                    continue
                if msg:
                    print(f"compile log {fname} HEAD_DIM={hd}: {msg}")
                with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                    f.write(cubin)
                    p = f.name
                try:
                    modules[spec] = cp.RawModule(path=p)
                finally:
                    os.unlink(p)

    def kernel(fname, name, hd=None):
        mod = modules.get((fname, hd))
        return None if mod is None else mod.get_function(name)

    # ---- helpers --------------------------------------------------------------------------
    GUARD = 1024
    POISON = {"f32": (np.float32, np.uint32, 0x7FC00000), "bf16": (np.uint16, np.uint16, 0x7FC0)}

    def bf16_bits(a):
        """float32 array -> bf16 bits (uint16), round to nearest even, NaN kept NaN."""
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        r = np.where(nan, (u >> 16) | 0x40, r)
        return r.astype(np.uint16)

    def bf16_to_f32(bits):
        return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)

    class Buf:
        """A device buffer with poisoned guard zones on both sides of the view."""

        def __init__(self, n, kind, offset=0):
            self.kind, self.n = kind, n
            dt, self.bits_t, self.bits = POISON[kind]
            self.raw = cp.empty(n + 2 * GUARD + offset, dtype=dt)
            self.lo = GUARD + offset
            self.view = self.raw[self.lo:self.lo + n]
            self.poison()

        def poison(self):
            self.raw.view(self.bits_t).fill(self.bits)

        def set(self, host):
            self.view[...] = cp.asarray(host.reshape(-1))

        def guards_ok(self):
            r = self.raw.view(self.bits_t)
            return bool((r[:self.lo] == self.bits).all()) and \
                bool((r[self.lo + self.n:] == self.bits).all())

        def host_f64(self):
            h = cp.asnumpy(self.view)
            return (bf16_to_f32(h) if self.kind == "bf16" else h).astype(np.float64)

    def record(kname, case, out64, ref64, tol, buf=None, note=""):
        nan = int(np.isnan(out64).sum())
        guards = buf.guards_ok() if buf is not None else True
        diff = out64 - ref64
        if nan:
            max_abs = rel = float("nan")
        else:
            max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
            nref = float(np.linalg.norm(ref64))
            rel = float(np.linalg.norm(diff)) / nref if nref > 0 else max_abs
        ok = nan == 0 and guards and rel <= tol
        msgs = [note] if note else []
        if nan:
            msgs.append(f"{nan} NaN/unwritten")
        if not guards:
            msgs.append("WROTE OUTSIDE THE OUTPUT")
        results.append((kname, case, max_abs, rel, tol, ok, "; ".join(msgs)))
        flag = "ok  " if ok else "FAIL"
        print(f"  {flag} {kname:<30} {case:<38} max|d|={max_abs:.3e} rel={rel:.3e} "
              f"(tol {tol:g}) {'; '.join(msgs)}")
        return ok

    def skip(kname, case, why):
        results.append((kname, case, float("nan"), float("nan"), 0.0, False, "NOT RUN: " + why))
        print(f"  FAIL {kname:<30} {case:<38} not run: {why}")

    def bench(fn):
        for _ in range(3):
            fn()
        cp.cuda.runtime.deviceSynchronize()
        ts = []
        for _ in range(iters):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
        return statistics.median(ts)

    def timed(kname, shape, fn, amount, unit):
        ms = bench(fn)
        val = amount / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
        timings.append((kname, shape, ms, val, unit))
        print(f"  time {kname:<30} {shape:<38} {ms * 1e3:9.1f} us  {val:8.1f} {unit}")

    i32, f32, i64 = np.int32, np.float32, np.int64
    store = {"f32": 4, "bf16": 2}

    # ---- reference functions (float64) -----------------------------------------------------
    def patchify_ref(clip, tub, p):
        b, c, t, h, w = clip.shape
        nt, nh, nw = t // tub, h // p, w // p
        x = clip[:, :, :nt * tub, :nh * p, :nw * p].reshape(b, c, nt, tub, nh, p, nw, p)
        return x.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, nt * nh * nw, c * tub * p * p)

    def ln_ref(x, g, bt, eps):
        x = x.astype(np.float64)
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g.astype(np.float64) + bt.astype(np.float64)

    def erf64(x):
        if torch is not None:
            return torch.special.erf(torch.from_numpy(x)).numpy()
        try:
            from scipy.special import erf
            return erf(x)
        except ImportError:
            return np.vectorize(math.erf, otypes=[np.float64])(x)

    def gelu_ref(x):
        x = x.astype(np.float64)
        return 0.5 * x * (1.0 + erf64(x / math.sqrt(2.0)))

    def attention_ref(qkv, b, n, H, D, scale, pairs):
        q = qkv.astype(np.float64).reshape(b, n, 3, H, D)
        out = {}
        for bi, h in pairs:
            Q, K, V = q[bi, :, 0, h], q[bi, :, 1, h], q[bi, :, 2, h]
            S = (Q @ K.T) * scale
            S -= S.max(axis=1, keepdims=True)
            P = np.exp(S)
            P /= P.sum(axis=1, keepdims=True)
            out[(bi, h)] = P @ V
        return out

    def run_ok(fn, *a, **k):
        try:
            fn(*a, **k)
            cp.cuda.runtime.deviceSynchronize()
            return None
        except Exception as e:  # launch failure, illegal address...
            return f"{type(e).__name__}: {e}"

    # ---- encoder ---------------------------------------------------------------------------
    enc_sel = [k for k in ENCODER_KERNELS if wanted(k, only)]
    if enc_sel:
        need_modules([("encoder.cu", None)])
    E = "encoder.cu"

    if any(k.startswith("patchify") for k in enc_sel):
        print("\npatchify")
        cases = [((2, 3, 4, 32, 48), 2, 16, 0, 0), ((1, 3, 5, 30, 30), 2, 6, 0, 0),
                 ((2, 2, 3, 16, 24), 1, 8, 1, 7), ((1, 3, 2, 12, 12), 2, 4, 0, 3)]
        if not quick:
            cases.append(((8, 3, 16, 224, 224), 2, 16, 0, 0))
        for kind in ("f32", "bf16"):
            kname = f"patchify_{kind}"
            if not wanted(kname, only):
                continue
            fn = kernel(E, kname)
            for shape, tub, p, off, grid_override in cases:
                case = f"clip{list(shape)} tub{tub} p{p}" + (f" off{off}" if off else "") + \
                    (f" grid{grid_override}" if grid_override else "")
                if fn is None:
                    skip(kname, case, "no module")
                    continue
                clip = rng.random(shape, dtype=np.float32)
                cbuf = Buf(clip.size, "f32", offset=off)
                cbuf.set(clip)
                ref = patchify_ref(clip, tub, p)
                out = Buf(ref.size, kind)
                total = ref.size
                grid = grid_override or min((total + 255) // 256, 1 << 20)
                args = (cbuf.view, out.view, i32(shape[0]), i32(shape[1]), i32(shape[2]),
                        i32(shape[3]), i32(shape[4]), i32(tub), i32(p))
                err = run_ok(fn, (grid,), (256,), args)
                if err:
                    skip(kname, case, err)
                    continue
                ref64 = bf16_to_f32(bf16_bits(ref)).astype(np.float64) if kind == "bf16" \
                    else ref.astype(np.float64)
                record(kname, case, out.host_f64().reshape(ref.shape), ref64, 0.0, out,
                       note="exact copy expected")
                if shape[0] == 8:
                    nbytes = clip.size * 4 + total * store[kind]
                    timed(kname, "ViT-B clip[8,3,16,224,224]",
                          lambda: fn((grid,), (256,), args), nbytes, "GB/s")

    def ln_inputs(rows, d):
        x = (rng.standard_normal((rows, d)) * 1.5 + 0.3).astype(np.float32)
        g = (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        bt = (0.1 * rng.standard_normal(d)).astype(np.float32)
        return x, g, bt

    eps = 1e-6
    if any(k.startswith("layer_norm") for k in enc_sel):
        print("\nlayer_norm")
        cases = [(37, 1, 0), (37, 16, 0), (37, 30, 0), (37, 32, 0), (37, 384, 0), (37, 768, 0),
                 (37, 1024, 0), (19, 1100, 0), (37, 768, 1)]
        if not quick:
            cases.append((8 * 1568, 768, 0))
        for kind in ("f32", "bf16"):
            kname = f"layer_norm_{kind}"
            if not wanted(kname, only):
                continue
            fn = kernel(E, kname)
            for rows, d, off in cases:
                case = f"rows{rows} d{d}" + (" x misaligned" if off else "")
                if fn is None:
                    skip(kname, case, "no module")
                    continue
                x, g, bt = ln_inputs(rows, d)
                xb = Buf(x.size, "f32", offset=off)
                xb.set(x)
                gd, bd = cp.asarray(g), cp.asarray(bt)
                y = Buf(x.size, kind)
                grid = (rows + 7) // 8
                args = (xb.view, y.view, gd, bd, i32(rows), i32(d), f32(eps))
                err = run_ok(fn, (grid,), (256,), args)
                if err:
                    skip(kname, case, err)
                    continue
                ok_x = bool((cp.asnumpy(xb.view) == x.reshape(-1)).all()) and xb.guards_ok()
                record(kname, case, y.host_f64().reshape(rows, d), ln_ref(x, g, bt, eps),
                       TOL_F32 if kind == "f32" else TOL_BF16, y,
                       note="" if ok_x else "INPUT x MODIFIED")
                if not ok_x:
                    results[-1] = results[-1][:5] + (False, results[-1][6])
                if rows == 8 * 1568:
                    timed(kname, "ViT-B [12544,768]", lambda: fn((grid,), (256,), args),
                          rows * d * (4 + store[kind]), "GB/s")

    if any(k.startswith("add_position") for k in enc_sel):
        print("\nadd_position_layer_norm")
        cases = [(25, 3, 16), (25, 3, 30), (25, 3, 768), (13, 2, 1100), (7, 3, 1)]
        if not quick:
            cases.append((1568, 8, 768))
        for kind in ("f32", "bf16"):
            kname = f"add_position_layer_norm_{kind}"
            if not wanted(kname, only):
                continue
            fn = kernel(E, kname)
            for tokens, clips, d in cases:
                rows = tokens * clips
                case = f"rows{rows} tokens{tokens} d{d}"
                if fn is None:
                    skip(kname, case, "no module")
                    continue
                x, g, bt = ln_inputs(rows, d)
                pos = (0.5 * rng.standard_normal((tokens, d))).astype(np.float32)
                xb = Buf(x.size, "f32")
                xb.set(x)
                y = Buf(x.size, kind)
                pd, gd, bd = cp.asarray(pos), cp.asarray(g), cp.asarray(bt)
                grid = (rows + 7) // 8
                args = (xb.view, pd, y.view, gd, bd, i32(rows), i32(tokens), i32(d), f32(eps))
                err = run_ok(fn, (grid,), (256,), args)
                if err:
                    skip(kname, case, err)
                    continue
                xn = (x.reshape(clips, tokens, d) + pos[None]).reshape(rows, d)  # f32 add
                record(kname + " [x+=pos]", case, xb.host_f64().reshape(rows, d),
                       xn.astype(np.float64), 0.0, xb, note="exact f32 add expected")
                record(kname, case, y.host_f64().reshape(rows, d), ln_ref(xn, g, bt, eps),
                       TOL_F32 if kind == "f32" else TOL_BF16, y)
                if rows == 8 * 1568:
                    timed(kname, "ViT-B [12544,768]", lambda: fn((grid,), (256,), args),
                          rows * d * (8 + store[kind]) + tokens * d * 4, "GB/s")

    if any(k.startswith("gelu") for k in enc_sel):
        print("\ngelu")
        cases = [(1, 0, 0), (7, 0, 0), (4099, 0, 0), (1000003, 0, 0), (1001, 1, 0), (100000, 0, 5)]
        if not quick:
            cases.append((8 * 1568 * 3072, 0, 0))
        for kind in ("f32", "bf16"):
            kname = f"gelu_{kind}"
            if not wanted(kname, only):
                continue
            fn = kernel(E, kname)
            for n, off, grid_override in cases:
                case = f"n{n}" + (f" off{off}" if off else "") + \
                    (f" grid{grid_override}" if grid_override else "")
                if fn is None:
                    skip(kname, case, "no module")
                    continue
                x = (rng.standard_normal(n) * 3.0).astype(np.float32)
                xb = Buf(n, kind, offset=off)
                if kind == "bf16":
                    bits = bf16_bits(x)
                    xb.set(bits)
                    x = bf16_to_f32(bits)
                else:
                    xb.set(x)
                per = 4 if kind == "f32" else 8
                grid = grid_override or max(1, min((n // per + 255) // 256, 1 << 16))
                args = (xb.view, i64(n))
                err = run_ok(fn, (grid,), (256,), args)
                if err:
                    skip(kname, case, err)
                    continue
                out = xb.host_f64()
                if n > 4_000_000 and torch is None:  # slow erf fallback: check a sample
                    idx = rng.choice(n, 1_000_000, replace=False)
                    ref, out = gelu_ref(x[idx]), out[idx]
                    assert not np.isnan(xb.host_f64()).any()
                else:
                    ref = gelu_ref(x)
                record(kname, case, out, ref, TOL_F32 if kind == "f32" else TOL_BF16, xb)
                if n == 8 * 1568 * 3072:
                    timed(kname, "ViT-B MLP [12544,3072]", lambda: fn((grid,), (256,), args),
                          2 * n * store[kind], "GB/s")

    if "mean_layer_norm" in enc_sel:
        print("\nmean_layer_norm")
        kname = "mean_layer_norm"
        fn = kernel(E, kname)
        cases = [(3, 37, 16), (3, 37, 30), (2, 100, 768), (2, 9, 1100), (1, 1, 5)]
        if not quick:
            cases.append((8, 1568, 768))
        for b, tokens, d in cases:
            case = f"b{b} tokens{tokens} d{d}"
            if fn is None:
                skip(kname, case, "no module")
                continue
            x, g, bt = ln_inputs(b * tokens, d)
            xd, gd, bd = cp.asarray(x), cp.asarray(g), cp.asarray(bt)
            y = Buf(b * d, "f32")
            args = (xd, y.view, gd, bd, i32(tokens), i32(d), f32(eps))
            err = run_ok(fn, (b,), (256,), args, shared_mem=d * 4)
            if err:
                skip(kname, case, err)
                continue
            ref = ln_ref(x.astype(np.float64).reshape(b, tokens, d).mean(1), g, bt, eps)
            record(kname, case, y.host_f64().reshape(b, d), ref, TOL_F32, y)
            if b == 8 and tokens == 1568:
                timed(kname, "ViT-B [8,1568,768]",
                      lambda: fn((b,), (256,), args, shared_mem=d * 4), x.size * 4, "GB/s")

    # ---- attention -------------------------------------------------------------------------
    variants = [
        # file, kernel, storage, tol, head dims (full), head dims (quick), min cc
        ("attention_simt.cu", "attention_simt_f32", "f32", TOL_F32,
         [64, 1, 4, 7, 16, 32, 80, 128, 256], [64, 7, 128], 0),
        ("attention_simt.cu", "attention_simt_bf16", "bf16", TOL_BF16,
         [64, 1, 4, 7, 16, 32, 80, 128, 256], [64, 7, 128], 0),
        ("attention_mma.cu", "attention_mma_bf16", "bf16", TOL_BF16,
         [64, 16, 32, 80, 128], [64, 16, 128], 80),
        ("attention_mma.cu", "attention_mma_tf32", "f32", TOL_TF32,
         [64, 16, 32, 80, 128], [64, 16, 128], 80),
    ]
    variants = [v for v in variants if wanted(v[1], only)]
    specs = set()
    for fname, kname, _, _, hds, qhds, mincc in variants:
        if cc >= mincc:
            specs.update((fname, h) for h in (qhds if quick else hds))
    if specs:
        need_modules(sorted(specs, key=lambda s: (s[0], -s[1])))

    def run_attention(fname, kname, kind, tol, hd, b, H, n, scale, case, pairs=None, time_it=False):
        fn = kernel(fname, kname, hd)
        if fn is None:
            skip(kname, case, "no module")
            return
        x = rng.standard_normal((b, n, 3, H, hd)).astype(np.float32)
        if kind == "bf16":
            bits = bf16_bits(x)
            x = bf16_to_f32(bits).reshape(x.shape)
        qb = Buf(x.size, kind)
        qb.set(bf16_bits(x) if kind == "bf16" else x)
        out = Buf(b * n * H * hd, kind)
        grid = ((n + 63) // 64, H, b)
        args = (qb.view, out.view, i32(n), i32(H), f32(scale))
        err = run_ok(fn, grid, (128,), args)
        if err:
            skip(kname, case, err)
            return
        pairs = pairs or [(bi, h) for bi in range(b) for h in range(H)]
        ref = attention_ref(x, b, n, H, hd, scale, pairs)
        o = out.host_f64().reshape(b, n, H, hd)
        nan_all = int(np.isnan(o).sum())
        got = np.stack([o[bi, :, h] for bi, h in pairs])
        want = np.stack([ref[p] for p in pairs])
        note = f"checked {len(pairs)}/{b * H} (clip, head)" if len(pairs) < b * H else ""
        if nan_all and not np.isnan(got).any():
            got = got * np.nan  # a NaN elsewhere still fails
        record(kname, case, got, want, tol, out, note)
        if time_it:
            flops = 4.0 * n * n * hd * b * H
            timed(kname, f"ViT-B b{b} n{n} {H}x{hd}", lambda: fn(grid, (128,), args), flops,
                  "TFLOP/s")
            return x
        return None

    vitb = (8, 12, 1568, 64)
    vitb_x = {}
    for fname, kname, kind, tol, hds, qhds, mincc in variants:
        print(f"\n{kname}")
        if cc < mincc:
            skip(kname, "all", f"needs sm_{mincc}+")
            continue
        for hd in (qhds if quick else hds):
            s = hd ** -0.5
            cases = [(1, 2, 1, s), (2, 3, 37, s), (1, 2, 64, s), (1, 2, 65, -s), (2, 2, 200, 2 * s)]
            if hd == 64 and not quick:
                cases.append((2, 2, 1568, s))
            for b, H, n, sc in cases:
                case = f"HD{hd} b{b} h{H} n{n} scale{sc:+.3f}"
                run_attention(fname, kname, kind, tol, hd, b, H, n, sc, case)
        if not quick and 64 in hds:
            b, H, n, hd = vitb
            pairs = [(0, 0), (0, H - 1), (b - 1, 0), (b - 1, H - 1), (3, 5)]
            x = run_attention(fname, kname, kind, tol, hd, b, H, n, hd ** -0.5,
                              f"ViT-B b{b} h{H} n{n} HD{hd}", pairs, time_it=True)
            if x is not None:
                vitb_x.setdefault(kind, x)

    if torch is not None and vitb_x and not quick:
        print("\ntorch.nn.functional.scaled_dot_product_attention (same data)")
        b, H, n, hd = vitb
        scale = hd ** -0.5
        for kind, x in sorted(vitb_x.items()):
            t = torch.from_numpy(x).cuda().view(b, n, 3, H, hd)
            dt = torch.bfloat16 if kind == "bf16" else torch.float32
            q, k, v = (t[:, :, i].transpose(1, 2).contiguous().to(dt) for i in range(3))

            def sdpa():
                try:
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
                except TypeError:  # torch < 2.1: default scale is hd^-0.5 already
                    return F.scaled_dot_product_attention(q, k, v)

            for _ in range(3):
                o = sdpa()
            torch.cuda.synchronize()
            ts = []
            for _ in range(iters):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                sdpa()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1))
            ms = statistics.median(ts)
            flops = 4.0 * n * n * hd * b * H
            name = f"torch_sdpa_{'bf16' if kind == 'bf16' else 'f32'}"
            timings.append((name, f"ViT-B b{b} n{n} {H}x{hd}", ms, flops / ms / 1e9, "TFLOP/s"))
            ref = attention_ref(x, b, n, H, hd, scale, [(0, 0), (b - 1, H - 1)])
            oo = o.float().cpu().numpy().astype(np.float64)
            got = np.stack([oo[0, 0], oo[b - 1, H - 1]])
            want = np.stack([ref[(0, 0)], ref[(b - 1, H - 1)]])
            rel = np.linalg.norm(got - want) / np.linalg.norm(want)
            print(f"  time {name:<30} {'ViT-B':<38} {ms * 1e3:9.1f} us  "
                  f"{flops / ms / 1e9:8.1f} TFLOP/s  (its rel err {rel:.2e}, for reference)")

    # ---- training ops (train.cu), f32, against numpy in float64 -----------------------------
    tr_sel = [k for k in TRAIN_KERNELS if wanted(k, only)]
    if tr_sel:
        need_modules([("train.cu", None)])
        print("\ntraining ops")
    TR = "train.cu"

    def tr_run(kname, grid, block, args, shared=0):
        fn = kernel(TR, kname)
        if fn is None:
            skip(kname, "-", "no module")
            return False
        try:
            fn(grid, block, args, shared_mem=shared)
            cp.cuda.runtime.deviceSynchronize()
            return True
        except Exception as e:
            skip(kname, "-", f"{type(e).__name__}: {e}")
            return False

    def tr_check(kname, case, got, ref, tol=TOL_F32):
        record(kname, case, np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64),
               tol)

    if tr_sel:
        b, n, w, cnt = 3, 40, 24, 17
        src = rng.standard_normal((b * n, w)).astype(np.float32)
        idx = np.stack([rng.permutation(n)[:cnt] for _ in range(b)]).astype(np.uint32)
        want = np.stack([src[bi * n + idx[bi]] for bi in range(b)]).reshape(b * cnt, w)
        d_src, d_idx = cp.asarray(src), cp.asarray(idx)
        if "gather_rows_f32" in tr_sel:
            d_dst = cp.full((b * cnt, w), np.nan, np.float32)
            if tr_run("gather_rows_f32", (b * cnt,), (128,),
                      (d_src, i64(n), i64(0), d_idx, d_dst, i64(cnt), i64(0), i32(b), i32(cnt),
                       i32(w), i32(0))):
                tr_check("gather_rows_f32", f"b{b} n{n} count{cnt} w{w}", cp.asnumpy(d_dst), want)
        if "scatter_add_rows_f32" in tr_sel:
            shared_rows = np.zeros((1, w), np.float32)   # every row into one shared row
            d_sh = cp.asarray(shared_rows)
            zeros = cp.zeros((b, cnt), cp.uint32)
            g = rng.standard_normal((b * cnt, w)).astype(np.float32)
            if tr_run("scatter_add_rows_f32", (b * cnt,), (128,),
                      (d_sh, i64(0), i64(0), zeros, cp.asarray(g), i64(cnt), i64(0), i32(b),
                       i32(cnt), i32(w), i32(1))):
                tr_check("scatter_add_rows_f32", "shared row", cp.asnumpy(d_sh)[0], g.sum(0), 1e-5)
        if "col_sum_f32" in tr_sel:
            rows, width, col0, cols = 1000, 50, 7, 30
            x = rng.standard_normal((rows, width)).astype(np.float32)
            dst = np.ones(cols, np.float32)
            d_dst = cp.asarray(dst)
            if tr_run("col_sum_f32", ((cols + 255) // 256, 64), (256,),
                      (cp.asarray(x), i64(rows), i32(width), i32(col0), i32(cols), d_dst)):
                tr_check("col_sum_f32", f"rows{rows} cols{col0}+{cols}", cp.asnumpy(d_dst),
                         1.0 + x[:, col0:col0 + cols].astype(np.float64).sum(0))
        for rows, d in [(37, 32), (37, 384), (20, 1100)]:
            x, gm, bt = ln_inputs(rows, d)
            x64 = x.astype(np.float64)
            mean = x64.mean(1, keepdims=True)
            rstd = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + eps)
            xh = (x64 - mean) * rstd
            if "layer_norm_fwd_f32" in tr_sel:
                y = cp.full(x.shape, np.nan, np.float32)
                st = cp.full((rows, 2), np.nan, np.float32)
                if tr_run("layer_norm_fwd_f32", ((rows + 7) // 8,), (256,),
                          (cp.asarray(x), cp.asarray(gm), cp.asarray(bt), y, st, i64(rows),
                           i32(d), f32(eps))):
                    tr_check("layer_norm_fwd_f32", f"rows{rows} d{d}", cp.asnumpy(y),
                             xh * gm + bt)
                    tr_check("layer_norm_fwd_f32", f"rows{rows} d{d} stats",
                             cp.asnumpy(st), np.concatenate([mean, rstd], 1), 1e-5)
            if "layer_norm_bwd_f32" in tr_sel:
                dy = rng.standard_normal((rows, d)).astype(np.float32)
                g = dy.astype(np.float64) * gm
                dx_ref = 1.0 + rstd * (g - g.mean(1, keepdims=True)
                                       - xh * (g * xh).mean(1, keepdims=True))
                st = np.concatenate([mean, rstd], 1).astype(np.float32)
                d_dx = cp.ones((rows, d), cp.float32)
                d_dg, d_db = cp.zeros(d, cp.float32), cp.zeros(d, cp.float32)
                if tr_run("layer_norm_bwd_f32", ((rows + 7) // 8,), (256,),
                          (cp.asarray(x), cp.asarray(st), cp.asarray(gm), cp.asarray(dy), d_dx,
                           d_dg, d_db, i64(rows), i32(d)), shared=8 * d):
                    tr_check("layer_norm_bwd_f32", f"rows{rows} d{d} dx", cp.asnumpy(d_dx),
                             dx_ref)
                    tr_check("layer_norm_bwd_f32", f"rows{rows} d{d} dgamma", cp.asnumpy(d_dg),
                             (dy * xh).sum(0))
                    tr_check("layer_norm_bwd_f32", f"rows{rows} d{d} dbeta", cp.asnumpy(d_db),
                             dy.astype(np.float64).sum(0))
        x = (rng.standard_normal(10007) * 3).astype(np.float32)
        x[:5] = [0.0, -0.0, 1e-30, -1e-30, 40.0]
        x64 = x.astype(np.float64)
        erf = np.vectorize(math.erf)
        cdf = 0.5 * (1 + erf(x64 / math.sqrt(2)))
        pdf = np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
        g = rng.standard_normal(x.size).astype(np.float32)
        nn = i64(x.size)
        grid1 = ((x.size + 255) // 256,)
        for kname, args_of, ref in [
            ("gelu_fwd_f32", lambda o: (cp.asarray(x), o, nn), x64 * cdf),
            ("gelu_bwd_f32", None, g * (cdf + x64 * pdf)),
            ("leaky_relu_f32", lambda o: (cp.asarray(x), o, nn, f32(0.01)),
             np.where(x64 > 0, x64, 0.01 * x64)),
            ("leaky_relu_bwd_f32", None, g * np.where(x64 > 0, 1.0, 0.01)),
        ]:
            if kname not in tr_sel:
                continue
            if args_of is None:
                o = cp.asarray(g)
                args = (cp.asarray(x), o, nn) + ((f32(0.01),) if "leaky" in kname else ())
            else:
                o = cp.full(x.size, np.nan, np.float32)
                args = args_of(o)
            if tr_run(kname, grid1, (256,), args):
                tr_check(kname, f"n{x.size}", cp.asnumpy(o), ref)
        p_, t_ = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(5000).astype(np.float32)
        if "sq_diff_sum_f32" in tr_sel:
            acc = cp.zeros(1, cp.float64)
            dp = cp.full(p_.size, np.nan, np.float32)
            if tr_run("sq_diff_sum_f32", (7,), (256,),
                      (cp.asarray(p_), cp.asarray(t_), dp, i64(p_.size), f32(2.0 / p_.size), acc)):
                diff = p_.astype(np.float64) - t_
                tr_check("sq_diff_sum_f32", "sum", cp.asnumpy(acc), [np.sum(diff * diff)], 1e-9)
                tr_check("sq_diff_sum_f32", "dpred", cp.asnumpy(dp), 2.0 / p_.size * diff)
        if "sum_f32" in tr_sel and "store_scaled_f32" in tr_sel:
            acc = cp.zeros(1, cp.float64)
            out = cp.full(1, np.nan, np.float32)
            if tr_run("sum_f32", (5,), (256,), (cp.asarray(p_), i64(p_.size), acc)) and \
                    tr_run("store_scaled_f32", (1,), (1,), (acc, out, np.float64(1.0 / p_.size))):
                tr_check("store_scaled_f32", "mean", cp.asnumpy(out), [p_.astype(np.float64).mean()])
        if "adamw_f32" in tr_sel:
            pn, gr = rng.standard_normal(3000).astype(np.float32), rng.standard_normal(3000).astype(np.float32)
            m0 = (0.1 * rng.standard_normal(3000)).astype(np.float32)
            v0 = np.abs(0.1 * rng.standard_normal(3000)).astype(np.float32)
            lr, b1, b2, ep, wd, t = 1e-3, 0.9, 0.95, 1e-8, 0.05, 3
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            m1 = b1 * m0.astype(np.float64) + (1 - b1) * gr
            v1 = b2 * v0.astype(np.float64) + (1 - b2) * gr.astype(np.float64) ** 2
            p1 = pn * (1 - lr * wd) - lr * (m1 / c1) / (np.sqrt(v1 / c2) + ep)
            d_p, d_m, d_v = cp.asarray(pn), cp.asarray(m0), cp.asarray(v0)
            if tr_run("adamw_f32", (12,), (256,),
                      (d_p, cp.asarray(gr), d_m, d_v, i64(pn.size), f32(lr), f32(b1), f32(b2),
                       f32(ep), f32(wd), f32(c1), f32(c2))):
                tr_check("adamw_f32", "p", cp.asnumpy(d_p), p1)
                tr_check("adamw_f32", "m, v", np.concatenate([cp.asnumpy(d_m), cp.asnumpy(d_v)]),
                         np.concatenate([m1, v1]))

    # ---- the training engine's f32 attention and its backward (train.cu) --------------------
    def attention_train_ref(qkv, b, n, h, hd, scale, dout):
        x = qkv.astype(np.float64).reshape(b, n, 3, h, hd)
        q, k, v = (x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [b, h, n, hd]
        sc = scale * q @ k.transpose(0, 1, 3, 2)
        mx = sc.max(-1, keepdims=True)
        e = np.exp(sc - mx)
        l = e.sum(-1, keepdims=True)
        pr = e / l
        o = pr @ v
        lse = (mx + np.log(l))[..., 0]
        do = dout.astype(np.float64).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
        delta = (do * o).sum(-1)
        ds = pr * (do @ v.transpose(0, 1, 3, 2) - delta[..., None])
        dq, dk = scale * ds @ k, scale * ds.transpose(0, 1, 3, 2) @ q
        dv = pr.transpose(0, 1, 3, 2) @ do
        dqkv = np.stack([dq, dk, dv], 2).transpose(0, 3, 2, 1, 4).reshape(b * n, 3 * h * hd)
        return o.transpose(0, 2, 1, 3).reshape(b * n, h * hd), lse, delta, dqkv

    for (b, n, h, hd, w) in [(2, 50, 3, 24, 32), (2, 197, 2, 64, 64), (1, 70, 1, 100, 128)]:
        names = [f"attention_{k}_f32_hd{w}" for k in ("fwd", "bwd_dq", "bwd_dkv")]
        if not any(k in tr_sel for k in names + ["attention_delta_f32"]):
            continue
        case = f"b{b} n{n} h{h} hd{hd}"
        scale = hd ** -0.5
        qkv = rng.standard_normal((b * n, 3 * h * hd)).astype(np.float32)
        dout = rng.standard_normal((b * n, h * hd)).astype(np.float32)
        o_ref, lse_ref, delta_ref, dqkv_ref = attention_train_ref(qkv, b, n, h, hd, scale, dout)
        d_qkv, d_dout = cp.asarray(qkv), cp.asarray(dout)
        if names[0] in tr_sel:
            o = cp.full((b * n, h * hd), np.nan, np.float32)
            lse = cp.full((b, h, n), np.nan, np.float32)
            if tr_run(names[0], ((n + 127) // 128, b * h), (128,),
                      (d_qkv, o, lse, i32(n), i32(h), i32(hd), f32(scale))):
                tr_check(names[0], case + " out", cp.asnumpy(o), o_ref)
                tr_check(names[0], case + " lse", cp.asnumpy(lse), lse_ref)
        d_out = cp.asarray(o_ref.astype(np.float32))
        d_lse = cp.asarray(lse_ref.astype(np.float32))
        delta = cp.full((b, h, n), np.nan, np.float32)
        if "attention_delta_f32" in tr_sel and \
                tr_run("attention_delta_f32", ((b * n * h + 255) // 256,), (256,),
                       (d_out, d_dout, delta, i64(b * n), i32(n), i32(h), i32(hd))):
            tr_check("attention_delta_f32", case, cp.asnumpy(delta), delta_ref)
        d_delta = cp.asarray(delta_ref.astype(np.float32))
        dqkv = cp.full((b * n, 3 * h * hd), np.nan, np.float32)
        ran = [tr_run(k, ((n + 63) // 64, b * h), (64,),
                      (d_qkv, d_dout, d_lse, d_delta, dqkv, i32(n), i32(h), i32(hd), f32(scale)))
               for k in names[1:] if k in tr_sel]
        if len(ran) == 2 and all(ran):
            tr_check(names[1] + "+dkv", case + " dqkv", cp.asnumpy(dqkv), dqkv_ref)

    # ---- the bf16 twins (a bf16 step's activations): inputs rounded to bf16, outputs read
    # back from bf16, against the float64 reference of the rounded inputs (TOL_BF16) ----------
    def b16(a):
        """float32 array -> (bf16 bits on the GPU, the rounded values as float64)."""
        bits = bf16_bits(np.asarray(a, np.float32))
        return cp.asarray(bits), bf16_to_f32(bits).astype(np.float64)

    def back(d):
        return bf16_to_f32(cp.asnumpy(d)).astype(np.float64)

    if "convert_f32_bf16" in tr_sel or "convert_bf16_f32" in tr_sel or "fill_bf16" in tr_sel:
        x = (rng.standard_normal(4099) * 5).astype(np.float32)
        d_b = cp.full(x.size, 0x7FC0, cp.uint16)
        if "convert_f32_bf16" in tr_sel and tr_run(
                "convert_f32_bf16", (17,), (256,), (cp.asarray(x), d_b, i64(x.size))):
            ok = np.array_equal(cp.asnumpy(d_b), bf16_bits(x))
            tr_check("convert_f32_bf16", "round to nearest even", [0.0 if ok else 1.0], [0.0], 0)
        if "convert_bf16_f32" in tr_sel:
            bits, vals = b16(x)
            d_f = cp.full(x.size, np.nan, np.float32)
            if tr_run("convert_bf16_f32", (17,), (256,), (bits, d_f, i64(x.size))):
                tr_check("convert_bf16_f32", "exact", cp.asnumpy(d_f), vals, 0)
        if "fill_bf16" in tr_sel:
            d_b = cp.zeros(1000, cp.uint16)
            if tr_run("fill_bf16", (3,), (256,), (d_b, i64(1000), f32(0.1))):
                tr_check("fill_bf16", "0.1", back(d_b), np.full(1000, bf16_to_f32(bf16_bits(np.float32([0.1])))[0]), 0)
    if "col_sum_bf16" in tr_sel:
        rows, width, col0, cols = 1000, 50, 7, 30
        bits, vals = b16(rng.standard_normal((rows, width)))
        d_dst = cp.ones(cols, cp.float32)
        if tr_run("col_sum_bf16", ((cols + 255) // 256, 64), (256,),
                  (bits, i64(rows), i32(width), i32(col0), i32(cols), d_dst)):
            tr_check("col_sum_bf16", f"rows{rows}", cp.asnumpy(d_dst),
                     1.0 + vals[:, col0:col0 + cols].sum(0), 1e-5)
    if "layer_norm_fwd_bf16" in tr_sel:
        rows, d = 37, 384
        x, gm, bt = ln_inputs(rows, d)
        x64 = x.astype(np.float64)
        mean = x64.mean(1, keepdims=True)
        rstd = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(1, keepdims=True) + eps)
        y = cp.full(x.shape, 0x7FC0, cp.uint16)
        st = cp.full((rows, 2), np.nan, np.float32)
        if tr_run("layer_norm_fwd_bf16", ((rows + 7) // 8,), (256,),
                  (cp.asarray(x), cp.asarray(gm), cp.asarray(bt), y, st, i64(rows), i32(d),
                   f32(eps))):
            tr_check("layer_norm_fwd_bf16", f"rows{rows} d{d}", back(y),
                     (x64 - mean) * rstd * gm + bt, TOL_BF16)
            tr_check("layer_norm_fwd_bf16", "stats (f32)", cp.asnumpy(st),
                     np.concatenate([mean, rstd], 1), 1e-5)
    if "gelu_fwd_bf16" in tr_sel or "gelu_bwd_bf16" in tr_sel:
        bits, xv = b16(rng.standard_normal(10007) * 3)
        erf = np.vectorize(math.erf)
        cdf = 0.5 * (1 + erf(xv / math.sqrt(2)))
        pdf = np.exp(-0.5 * xv * xv) / math.sqrt(2 * math.pi)
        if "gelu_fwd_bf16" in tr_sel:
            o = cp.full(xv.size, 0x7FC0, cp.uint16)
            if tr_run("gelu_fwd_bf16", (40,), (256,), (bits, o, i64(xv.size))):
                tr_check("gelu_fwd_bf16", f"n{xv.size}", back(o), xv * cdf, TOL_BF16)
        if "gelu_bwd_bf16" in tr_sel:
            gbits, gv = b16(rng.standard_normal(xv.size))
            if tr_run("gelu_bwd_bf16", (40,), (256,), (bits, gbits, i64(xv.size))):
                tr_check("gelu_bwd_bf16", f"n{xv.size}", back(gbits), gv * (cdf + xv * pdf),
                         TOL_BF16)
    for (b, n, h, hd, w) in [(2, 50, 3, 24, 32), (2, 197, 2, 64, 64)]:
        names = [f"attention_{k}_bf16_hd{w}" for k in ("fwd", "bwd_dq", "bwd_dkv")]
        if not any(k in tr_sel for k in names + ["attention_delta_bf16"]):
            continue
        case = f"b{b} n{n} h{h} hd{hd} bf16"
        scale = hd ** -0.5
        q_bits, qkv = b16(rng.standard_normal((b * n, 3 * h * hd)))
        g_bits, dout = b16(rng.standard_normal((b * n, h * hd)))
        o_ref, lse_ref, delta_ref, dqkv_ref = attention_train_ref(qkv, b, n, h, hd, scale, dout)
        if names[0] in tr_sel:
            o = cp.full((b * n, h * hd), 0x7FC0, cp.uint16)
            lse = cp.full((b, h, n), np.nan, np.float32)
            if tr_run(names[0], ((n + 127) // 128, b * h), (128,),
                      (q_bits, o, lse, i32(n), i32(h), i32(hd), f32(scale))):
                tr_check(names[0], case + " out", back(o), o_ref, TOL_BF16)
                tr_check(names[0], case + " lse", cp.asnumpy(lse), lse_ref, 1e-5)
        o_bits, o_vals = b16(o_ref)
        # The backward's references from the bf16-rounded output the forward stored.
        delta_ref = (o_vals.reshape(b, n, h, hd) * dout.reshape(b, n, h, hd)).sum(-1)
        delta_ref = delta_ref.transpose(0, 2, 1)
        delta = cp.full((b, h, n), np.nan, np.float32)
        if "attention_delta_bf16" in tr_sel and \
                tr_run("attention_delta_bf16", ((b * n * h + 255) // 256,), (256,),
                       (o_bits, g_bits, delta, i64(b * n), i32(n), i32(h), i32(hd))):
            tr_check("attention_delta_bf16", case, cp.asnumpy(delta), delta_ref, 1e-5)
        d_lse = cp.asarray(lse_ref.astype(np.float32))
        d_delta = cp.asarray(delta_ref.astype(np.float32))
        dqkv = cp.full((b * n, 3 * h * hd), 0x7FC0, cp.uint16)
        ran = [tr_run(k, ((n + 63) // 64, b * h), (64,),
                      (q_bits, g_bits, d_lse, d_delta, dqkv, i32(n), i32(h), i32(hd), f32(scale)))
               for k in names[1:] if k in tr_sel]
        if len(ran) == 2 and all(ran):
            tr_check(names[1] + "+dkv", case + " dqkv", back(dqkv), dqkv_ref, TOL_BF16)

    # ---- summary ---------------------------------------------------------------------------
    print("\n" + "=" * 100)
    print(f"SUMMARY on {gpu_name} ({arch})")
    print(f"{'kernel':<40}{'checks':>8}{'failed':>8}{'worst rel':>12}{'tol':>9}")
    by = {}
    for kname, case, max_abs, rel, tol, ok, note in results:
        e = by.setdefault(kname, [0, 0, 0.0, tol])
        e[0] += 1
        e[1] += 0 if ok else 1
        e[2] = max(e[2], rel) if not math.isnan(rel) else float("inf")
    for kname, (nchk, nfail, worst, tol) in by.items():
        print(f"{kname:<40}{nchk:>8}{nfail:>8}{worst:>12.2e}{tol:>9g}"
              + ("   FAIL" if nfail else ""))
    # One line per kernel for bench/gpu_results.py: its worst relative error.
    for kname, (_, _, worst, _) in by.items():
        print(f"parity kernel_{kname} {worst:.3e}")
    if timings:
        print(f"\n{'timing (median of %d)' % iters:<32}{'shape':<30}{'us':>10}{'rate':>12}")
        for kname, shape, ms, val, unit in timings:
            print(f"{kname:<32}{shape:<30}{ms * 1e3:>10.1f}{val:>9.1f} {unit}")
    failed = [r for r in results if not r[5]]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed")
    for kname, case, _, rel, tol, _, note in failed:
        print(f"  FAILED {kname} {case}: rel {rel:.3e} tol {tol:g} {note}")
    return 1 if failed or not results else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true",
                    help="compile every .cu with NVRTC (no GPU needed) and exit")
    ap.add_argument("--sources", default=str(DEFAULT_SOURCES),
                    help="folder of the .cu files (default: %(default)s)")
    ap.add_argument("--only", default=None,
                    help="only kernels whose name contains this (e.g. attention_mma, gelu_bf16)")
    ap.add_argument("--quick", action="store_true", help="small shapes only (no ViT-B shapes)")
    ap.add_argument("--head-dims", default=None,
                    help="compile-only: comma-separated HEAD_DIM values for the attention files "
                         "(the mma file takes the multiples of 16 in 16..128)")
    ap.add_argument("--iters", type=int, default=30, help="timed runs per kernel (>= 20)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="parallel NVRTC compilations (default: CPU count)")
    args = ap.parse_args()
    srcdir = Path(args.sources).resolve()

    try:
        nvrtc = Nvrtc.load()
    except RuntimeError as e:
        if args.compile_only:
            print(e)
            return 2
        nvrtc = None
    if args.compile_only:
        hds = [int(h) for h in args.head_dims.split(",")] if args.head_dims else None
        return compile_only(nvrtc, srcdir, args.only, hds, max(1, args.jobs))
    return gpu_mode(nvrtc, srcdir, args.only, args.quick, max(20, args.iters))


if __name__ == "__main__":
    sys.exit(main())
