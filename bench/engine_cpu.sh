#!/usr/bin/env bash
# The CPU's extraction on the engine's schedule (the host twin of the CUDA engine, the default)
# against burn's ops with the fused host block (MARLIN_ENGINE=burn, the path before the
# engine), same binary, same machine: ViT-B extract_features at batch 1 (random weights),
# seconds per clip, the median of alternating rounds, in f32 and bf16 (bf16 where the CPU has
# AVX-512 BF16; MARLIN_BF16_WITHOUT_AMX=1 keeps it on CPUs without AMX).
#
#   [PRECISIONS="fp32 bf16"] bench/engine_cpu.sh [threads] [rounds]
#
# (MARLIN_BIN=path/to/marlin times that build instead of building the default one.)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
rounds=${2:-3}
export RAYON_NUM_THREADS=$threads MARLIN_BF16_WITHOUT_AMX=1
if [ -z "${MARLIN_BIN:-}" ]; then cargo build --release -q; fi
bin=${MARLIN_BIN:-$PWD/target/release/marlin}
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F); $($bin --version 2>/dev/null || echo marlin)"
median() { python3 -c "import sys, statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.4f}')" "$@"; }
clip() { "$@" | sed -n 's/^seconds per clip: \([0-9.]*\).*/\1/p'; }
declare -A t
for round in $(seq "$rounds"); do
  for p in ${PRECISIONS:-fp32 bf16}; do
    t[engine-$p]+=" $(clip "$bin" bench --model marlin_vit_base_ytf --iters 3 --precision "$p")"
    t[burn-$p]+=" $(clip env MARLIN_ENGINE=burn "$bin" bench --model marlin_vit_base_ytf --iters 3 --precision "$p")"
  done
done
for p in ${PRECISIONS:-fp32 bf16}; do
  e=$(median ${t[engine-$p]}); b=$(median ${t[burn-$p]})
  echo "$p: engine schedule $e s/clip (rounds:${t[engine-$p]}); burn's ops $b s/clip (rounds:${t[burn-$p]}); engine / burn $(python3 -c "print(f'{$e / $b:.3f}')")"
done
