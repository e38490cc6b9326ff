#!/usr/bin/env python3
"""Run a command and report the GPU's peak memory while it ran, device-wide as NVML counts it
(every process, the CUDA context, allocator pools), above what was in use before it started:
the same measure for marlin-rs and marlin-pytorch (bench/gpu.sh). Needs only the driver's
libnvidia-ml (ctypes, no Python packages).

  python3 bench/gpu_peak.py [--gpu 0] -- COMMAND ARGS...

Prints the command's output, then `nvml peak: N MiB above the M MiB in use before`; exits with
the command's status."""
import ctypes
import subprocess
import sys
import threading
import time


class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml(index):
    lib = ctypes.CDLL("libnvidia-ml.so.1")
    if lib.nvmlInit_v2() != 0:
        raise OSError("nvmlInit failed")
    handle = ctypes.c_void_p()
    if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
        raise OSError(f"no GPU {index}")

    def used():
        m = Memory()
        lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(m))
        return m.used

    return used


def main():
    args = sys.argv[1:]
    gpu = 0
    if args[:1] == ["--gpu"]:
        gpu, args = int(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        used = nvml(gpu)
    except OSError as e:
        print(f"nvml peak: unavailable ({e})")
        sys.exit(subprocess.call(args))
    before = used()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    rc = subprocess.call(args)
    done.set()
    t.join()
    print(f"nvml peak: {(peak[0] - before) / 2**20:.0f} MiB above the {before / 2**20:.0f} MiB in use before")
    sys.exit(rc)


if __name__ == "__main__":
    main()
