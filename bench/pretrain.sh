#!/usr/bin/env bash
# Pretraining step time, marlin-rs vs the reference step in PyTorch (marlin-pytorch's modules,
# same critic and AdamW), ViT-B, random clips and 90% masks, same machine and thread count.
#
#   PEER_PY=/opt/venv/peer/bin/python bench/pretrain.sh [threads] [batch]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
batch=${2:-2}
PEER_PY=${PEER_PY:-python3}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
cargo build --release -q
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"
ours=$(target/release/marlin bench --train --batch-size "$batch" --iters 2 | sed -n 's/^seconds per step: \([0-9.]*\).*/\1/p')
peer=$("$PEER_PY" bench/peer_pretrain_step.py --batch "$batch" --iters 2 --threads "$threads" | sed -n 's/^peer seconds per step: \([0-9.]*\).*/\1/p')
echo "marlin-rs      $ours s/step (batch $batch)"
echo "marlin-pytorch $peer s/step (batch $batch)"
python3 -c "print(f'ratio (ours / peer): {$ours / $peer:.2f}x')"
