#!/usr/bin/env bash
# Side-by-side GPU benchmarks in one call on the device machine (after bench/gpu_prepare.sh
# here, with `carry` [".gpu"]): ViT-B features, clips/s at batch 64, and the pretraining step,
# samples/s at batch 16, marlin-rs (f32) against marlin-pytorch in fp32, TF32 and bf16 autocast.
# Random weights and clips, as bench/cpu.sh. burn's CUDA backend compiles and autotunes its
# kernels on first use (minutes): the first, untimed iteration of each command absorbs it.
#
#   bash bench/gpu.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
BIN=${BIN:-.gpu/marlin}
export PYTHONPATH=${PYTHONPATH:-$PWD/.gpu/pydeps}
echo "== machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $(date -u +%F)"
echo "== 1. extract_features, ViT-B, batch 64 (clips/s)"
"$BIN" bench --device cuda --batch-size 64 --iters 5
for p in fp32 tf32 bf16; do
  "$PY" bench/peer_features.py --device cuda --batch-size 64 --iters 5 --precision "$p"
done
echo "== 2. pretraining step (critic + generator), ViT-B, batch 16 (samples/s)"
"$BIN" bench --train --device cuda --batch-size 16 --iters 5
for p in fp32 tf32 bf16; do
  "$PY" bench/peer_pretrain_step.py --device cuda --batch 16 --iters 5 --precision "$p"
done
echo "== 3. face parser on CUDA (burn's ops) against the CPU's host kernels: the same label map"
face=tests/fixtures/face/astronaut256.png
work=$(mktemp -d)
"$BIN" parse "$face" --save-map "$work/cpu.npy" && "$BIN" parse "$face" --device cuda --save-map "$work/cuda.npy" \
  && "$PY" -c "import numpy as np, sys; a, b = np.load(sys.argv[1]), np.load(sys.argv[2]); print(f'label maps: {(a != b).sum()} of {a.size} pixels differ')" "$work/cpu.npy" "$work/cuda.npy"
