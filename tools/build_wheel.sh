#!/usr/bin/env bash
# The redistributable wheel of the Python package (`pip install marlin-rs`): manylinux_2_28,
# abi3 (CPython 3.9+), with the CPU kernels, in-process H.264, Vulkan and CUDA (the CUDA
# engine and burn's CUDA backend) in one file. NVIDIA's libraries are opened at run time, so
# the wheel installs and runs on a machine without a GPU, driver or toolkit. Built with zig as
# the C/C++ compiler and linker for glibc 2.28 (no container needed); `auditwheel show` says
# which policy it meets. Multi-process CPU training (Gloo) is left out of the wheel
# (MARLIN_NO_GLOO=1): the `marlin` command of a source build has it.
#
#   tools/build_wheel.sh [OUT_DIR]          # default: dist/
#   FEATURES="vulkan cuda" tools/build_wheel.sh
#
# First build: about 30 minutes on 2 cores (its own target folder, target-wheel/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
venv=${WHEEL_VENV:-target-wheel/venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check maturin ziglang auditwheel
# maturin finds zig through the Python on PATH (ziglang's `python -m ziglang`).
export PATH="$(cd "$venv" && pwd)/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-wheel}
export MARLIN_NO_GLOO=1
# Without nasm OpenH264 builds its C paths (the same pixels, 10-60% slower to decode).
"$venv/bin/maturin" build --release --zig --compatibility manylinux_2_28 \
  -m python/Cargo.toml -o "$out" --features "${FEATURES:-vulkan cuda}"
wheel=$(ls -t "$out"/marlin_rs-*.whl | head -1)
"$venv/bin/auditwheel" show "$wheel"
echo "$wheel: $(du -h "$wheel" | cut -f1)"
