#!/usr/bin/env bash
# Data-parallel pretraining on the CPU, side by side with the peer: one ViT-B pretraining step
# (critic + generator, random clips and 90% masks) at a global batch of 2 on the machine's
# cores, as one process at batch 2 with all threads, and as 2 ranks (torchrun's variables, one
# machine) at batch 1 with half the threads each, gradients all-reduced (ours: Gloo through
# src/distributed; the peer: torch DDP over Gloo via torchrun). Ours twice: burn's autodiff step
# and the training engine's step (`--train-engine`, `marlin pretrain`'s CPU default), whose 2
# ranks run twice: one all-reduce after the backward (the CPU's default) and 25 MiB buckets
# all-reduced as the backward finishes them, overlapped with the rest of the backward
# (`--bucket-mb 25`, the default on CUDA). Medians of 3 alternating rounds.
#
#   PEER_PY=/opt/venv/peer/bin/python bench/ddp_cpu.sh [threads]
# (MARLIN_BIN=path/to/marlin uses that build instead of building the default one.)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
half=$(( threads / 2 > 0 ? threads / 2 : 1 ))
PEER_PY=${PEER_PY:-python3}
ITERS=${ITERS:-2}
if [ -z "${MARLIN_BIN:-}" ]; then cargo build --release -q; fi
bin=${MARLIN_BIN:-$PWD/target/release/marlin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
port=29600
step_of() { sed -n 's/^\(peer \)\{0,1\}seconds per step: \([0-9.]*\).*/\2/p' "$@" | head -1; }
# Two ranks of a command; rank 0's output in $work/r0.txt.
two() {
  port=$((port + 1))
  for r in 1 0; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      RAYON_NUM_THREADS=$half OMP_NUM_THREADS=$half "$@" > "$work/r$r.txt" 2>&1 &
  done
  wait
  cat "$work/r0.txt" >&2
}
o1=(); o2=(); e1=(); e2=(); e3=(); p1=(); p2=(); ar=(); ear=(); ew=(); ear3=(); ew3=()
waited() { sed -n 's/^all-reduce per step: .*the step waited \([0-9.]*\) s.*/\1/p' "$work/r0.txt"; }
for round in 1 2 3; do
  o1+=("$(RAYON_NUM_THREADS=$threads "$bin" bench --train --model marlin_vit_base_ytf --batch-size 2 --iters "$ITERS" | tee >(cat >&2) | step_of)")
  two "$bin" bench --train --model marlin_vit_base_ytf --batch-size 1 --iters "$ITERS"
  o2+=("$(step_of "$work/r0.txt")")
  ar+=("$(sed -n 's/^all-reduce per step: \([0-9.]*\) s.*/\1/p' "$work/r0.txt")")
  e1+=("$(RAYON_NUM_THREADS=$threads "$bin" bench --train --train-engine --model marlin_vit_base_ytf --batch-size 2 --iters "$ITERS" | tee >(cat >&2) | step_of)")
  two "$bin" bench --train --train-engine --model marlin_vit_base_ytf --batch-size 1 --iters "$ITERS"
  e2+=("$(step_of "$work/r0.txt")")
  ear+=("$(sed -n 's/^all-reduce per step: \([0-9.]*\) s.*/\1/p' "$work/r0.txt")")
  ew+=("$(waited)")
  two "$bin" bench --train --train-engine --model marlin_vit_base_ytf --batch-size 1 --iters "$ITERS" --bucket-mb 25
  e3+=("$(step_of "$work/r0.txt")")
  ear3+=("$(sed -n 's/^all-reduce per step: \([0-9.]*\) s.*/\1/p' "$work/r0.txt")")
  ew3+=("$(waited)")
  p1+=("$("$PEER_PY" bench/peer_pretrain_step.py --threads "$threads" --batch 2 --iters "$ITERS" | tee >(cat >&2) | step_of)")
  two "$PEER_PY" bench/peer_pretrain_step.py --threads "$half" --batch 1 --iters "$ITERS" --ddp
  p2+=("$(step_of "$work/r0.txt")")
done
echo "rounds: ours 1 process ${o1[*]}; ours 2 ranks ${o2[*]} (all-reduce ${ar[*]}); engine 1 process ${e1[*]}; engine 2 ranks ${e2[*]} (all-reduce ${ear[*]}, waited ${ew[*]}); engine 2 ranks, 25 MiB buckets ${e3[*]} (all-reduce ${ear3[*]}, waited ${ew3[*]}); peer 1 process ${p1[*]}; peer 2 ranks ${p2[*]}"
O1=$(median "${o1[@]}"); O2=$(median "${o2[@]}"); P1=$(median "${p1[@]}"); P2=$(median "${p2[@]}")
E1=$(median "${e1[@]}"); E2=$(median "${e2[@]}"); E3=$(median "${e3[@]}")
echo "== ViT-B pretraining step, global batch 2, seconds per step (medians of 3 rounds)"
echo "ours: 1 process x $threads threads $O1; 2 ranks x $half threads $O2 (all-reduce $(median "${ar[@]}") s of it); 2 ranks / 1 process $(python3 -c "print(f'{$O2/$O1:.2f}')")"
echo "engine: 1 process x $threads threads $E1; 2 ranks x $half threads $E2 (all-reduce $(median "${ear[@]}") s, the step waited $(median "${ew[@]}") s for it); 2 ranks / 1 process $(python3 -c "print(f'{$E2/$E1:.2f}')")"
echo "engine, 25 MiB buckets overlapped with the backward: 2 ranks $E3 (all-reduce $(median "${ear3[@]}") s, the step waited $(median "${ew3[@]}") s); buckets / one $(python3 -c "print(f'{$E3/$E2:.2f}')")"
echo "peer: 1 process x $threads threads $P1; 2 ranks x $half threads $P2; 2 ranks / 1 process $(python3 -c "print(f'{$P2/$P1:.2f}')")"
echo "ours / peer: 1 process $(python3 -c "print(f'{$O1/$P1:.2f}')"), 2 ranks $(python3 -c "print(f'{$O2/$P2:.2f}')")"
echo "engine / peer: 1 process $(python3 -c "print(f'{$E1/$P1:.2f}')"), 2 ranks $(python3 -c "print(f'{$E2/$P2:.2f}')")"
