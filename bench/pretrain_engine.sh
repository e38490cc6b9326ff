#!/usr/bin/env bash
# The pretraining step on the CPU: the training engine's schedule on its host ops
# (`marlin bench --train --train-engine`) against burn's autodiff step (`marlin bench --train`,
# what `marlin pretrain` runs today), ViT-B by default, random clips and 90% masks, same
# machine and threads, alternating rounds, medians.
#
#   bench/pretrain_engine.sh [threads] [batch] [model]
#   FEATURES=vulkan,cuda-engine bench/pretrain_engine.sh   # reuse the test build's binary
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
batch=${2:-2}
model=${3:-marlin_vit_base_ytf}
export RAYON_NUM_THREADS=$threads
cargo build --release -q --features "${FEATURES:-}"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F); $model batch $batch"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
step() { target/release/marlin bench --model "$model" --train "$@" --batch-size "$batch" --iters 2 \
  | sed -n 's/^seconds per step: \([0-9.]*\).*/\1/p'; }
# This machine's timings move by up to 15-25% between runs: 3 alternating rounds, medians.
e=(); b=()
for round in 1 2 3; do
  e+=("$(step --train-engine)")
  b+=("$(step)")
done
eng=$(median "${e[@]}"); brn=$(median "${b[@]}")
echo "training engine (host ops) $eng s/step (rounds: ${e[*]})"
echo "burn autodiff step         $brn s/step (rounds: ${b[*]})"
python3 -c "print(f'ratio (engine / burn): {$eng / $brn:.2f}x')"
