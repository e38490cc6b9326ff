#!/usr/bin/env bash
# The fine-tuning step on the CPU: the training engine's schedule on its host ops
# (`marlin bench --finetune --train-engine`, what `marlin finetune` runs by default), burn's
# autodiff step (`--step burn`) and the reference's step in PyTorch (marlin-pytorch's ViT-B
# encoder, mean-pooled, a 40-label head, BCE, Adam), random clips, same machine and threads,
# alternating rounds, medians.
#
#   PEER_PY=/tmp/peer/bin/python bench/finetune.sh [threads] [batch]
#   FEATURES=vulkan,cuda-engine bench/finetune.sh   # reuse the test build's binary
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
batch=${2:-1}
PEER_PY=${PEER_PY:-python3}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
cargo build --release -q --features "${FEATURES:-}"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F); ViT-B batch $batch"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
step() { target/release/marlin bench --finetune "$@" --batch-size "$batch" --iters 2 \
  | sed -n 's/^seconds per step: \([0-9.]*\).*/\1/p'; }
# This machine's timings move by up to 15-25% between runs: 3 alternating rounds, medians.
e=(); b=(); p=()
for round in 1 2 3; do
  e+=("$(step --train-engine)")
  b+=("$(step)")
  p+=("$("$PEER_PY" bench/peer_finetune_step.py --batch "$batch" --iters 2 --threads "$threads" | sed -n 's/^peer seconds per step: \([0-9.]*\).*/\1/p')")
done
eng=$(median "${e[@]}"); brn=$(median "${b[@]}"); peer=$(median "${p[@]}")
echo "training engine (host ops) $eng s/step (rounds: ${e[*]})"
echo "burn autodiff step         $brn s/step (rounds: ${b[*]})"
echo "marlin-pytorch             $peer s/step (rounds: ${p[*]})"
python3 -c "print(f'ratios: engine / peer {$eng / $peer:.2f}x, burn / peer {$brn / $peer:.2f}x')"
