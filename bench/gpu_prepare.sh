#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on the GPU machine, here (no GPU or CUDA needed to build):
#   .gpu/marlin        the stripped `--features cuda` binary (about 11 minutes from scratch on 2 cores)
#   .gpu/pydeps/       marlin_pytorch, einops, tqdm and yaml from the peer venv (the device has torch but no
#                      package registry), put on PYTHONPATH by bench/gpu.sh
# .gpu/ is git-ignored: name it in the device call's `carry` (".gpu").
#
#   PEER_PY=/opt/venv/peer/bin/python bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_PY=${PEER_PY:-python3}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target-cuda}
cargo build --release --features cuda
mkdir -p .gpu/pydeps
cp "$CARGO_TARGET_DIR/release/marlin" .gpu/marlin
strip .gpu/marlin
site=$("$PEER_PY" -c "import marlin_pytorch, os; print(os.path.dirname(os.path.dirname(marlin_pytorch.__file__)))")
# marlin_pytorch and what it imports that a torch-only machine may lack (pure Python; OpenCV
# and ffmpeg-python are stubbed by the peer scripts: the timed code never calls them).
for pkg in marlin_pytorch einops tqdm yaml; do
  rm -rf ".gpu/pydeps/$pkg"
  cp -r "$site/$pkg" .gpu/pydeps/
done
du -sh .gpu/marlin .gpu/pydeps
