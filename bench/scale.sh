#!/usr/bin/env bash
# One process vs N shards on the same machine: videos per second for the same dataset, the
# same total thread count (one process with T threads; N shards with T/N threads each, run at
# once). Medians of 3 rounds that alternate the two.
#
#   bench/scale.sh [threads] [shards] [videos]
#
# Data: `videos` 3 s, 30 fps, 224x224 H.264 test patterns (90 frames -> 2 clips each); random
# ViT-B weights (`marlin extract --weights` on a safetensors file made by the library).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}; shards=${2:-2}; videos=${3:-8}
cargo build --release -q
bin=$PWD/target/release/marlin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in"
for i in $(seq 1 "$videos"); do
  ffmpeg -v error -y -f lavfi -i "testsrc2=size=224x224:rate=30" -frames:v 90 -vf "hue=h=$((i * 37))" \
    -c:v libx264 -pix_fmt yuv420p "$work/in/v$i.mp4"
done
$bin bench --model marlin_vit_base_ytf --iters 1 --save-weights "$work/vitb.safetensors" >/dev/null
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads, $shards shards, $videos videos; $(date -u +%F)"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
rate() { python3 -c "print(f'{$videos / ($2 - $1):.3f}')"; }
one=(); split=()
for round in 1 2 3; do
  rm -rf "$work/o1" "$work/o2"
  t0=$(date +%s.%N)
  RAYON_NUM_THREADS=$threads $bin extract "$work/in" --weights "$work/vitb.safetensors" --out "$work/o1" --quiet
  t1=$(date +%s.%N)
  one+=("$(rate "$t0" "$t1")")
  t0=$(date +%s.%N)
  for s in $(seq 0 $((shards - 1))); do
    RAYON_NUM_THREADS=$((threads / shards > 0 ? threads / shards : 1)) \
      $bin extract "$work/in" --weights "$work/vitb.safetensors" --out "$work/o2" --quiet --shard "$s/$shards" 2>/dev/null &
  done
  wait
  t1=$(date +%s.%N)
  split+=("$(rate "$t0" "$t1")")
  cmp <(cd "$work/o1" && cat $(ls *.npy)) <(cd "$work/o2" && cat $(ls *.npy)) >/dev/null || { echo "outputs differ"; exit 1; }
done
a=$(median "${one[@]}"); b=$(median "${split[@]}")
echo "one process, $threads threads:              $a videos/s (rounds: ${one[*]})"
echo "$shards shards at once, $((threads / shards)) thread(s) each: $b videos/s (rounds: ${split[*]})"
python3 -c "print(f'ratio (shards / one): {$b / $a:.2f}x; outputs identical')"
