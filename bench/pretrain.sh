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
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
# This machine's timings move by up to 15-25% between runs: 3 alternating rounds, medians.
o=(); p=()
for round in 1 2 3; do
  o+=("$(target/release/marlin bench --train --batch-size "$batch" --iters 2 | sed -n 's/^seconds per step: \([0-9.]*\).*/\1/p')")
  p+=("$("$PEER_PY" bench/peer_pretrain_step.py --batch "$batch" --iters 2 --threads "$threads" | sed -n 's/^peer seconds per step: \([0-9.]*\).*/\1/p')")
done
ours=$(median "${o[@]}"); peer=$(median "${p[@]}")
echo "marlin-rs      $ours s/step (batch $batch; rounds: ${o[*]})"
echo "marlin-pytorch $peer s/step (batch $batch; rounds: ${p[*]})"
python3 -c "print(f'ratio (ours / peer): {$ours / $peer:.2f}x')"
