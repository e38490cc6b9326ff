#!/usr/bin/env bash
# Side-by-side CPU benchmarks of marlin-rs and marlin-pytorch, same machine, same thread count,
# one run; every figure is the median of 3 rounds that alternate the programs. PEER_PY is a python with marlin-pytorch and torch (a throw-away venv, see
# tools/make_model_fixtures.py).
#
#   PEER_PY=/opt/venv/peer/bin/python bench/cpu.sh [threads]
#
# (MARLIN_BIN=path/to/marlin times that build instead of building the default one.)
#
# 1. ViT-B extract_features, seconds per clip (batch 1, random weights); the peer in fp32 and
#    under torch.autocast(bfloat16) (its fastest CPU mode where the CPU has bf16 instructions);
#    each with its GFLOP/s and share of this CPU's measured peaks (`marlin bench --peak`, the
#    median of the rounds): f32 rows of the f32 FMA peak, bf16 rows of the bf16 dot-product
#    peak where the CPU has AVX-512 BF16 (AMX tiles, where present, go beyond it).
# 2. End to end: a 10 s, 30 fps, 224x224 H.264 video (300 frames -> 9 clips) through
#    `marlin extract` and the peer's extract_video, ViT-B weights from the same .pt file.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
PEER_PY=${PEER_PY:-python3}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
if [ -z "${MARLIN_BIN:-}" ]; then cargo build --release -q; fi
bin=${MARLIN_BIN:-$PWD/target/release/marlin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
echo "== 1. ViT-B extract_features, batch 1 (3 alternating rounds of 3 clips each; medians)"
o=(); ob=(); p=(); pb=(); fpk=(); bpk=(); gflop=357.0
peer_clip() { "$PEER_PY" bench/peer_features.py --threads "$threads" --iters 3 "$@" | sed -n 's/^peer seconds per clip: \([0-9.]*\).*/\1/p'; }
for round in 1 2 3; do
  r=$($bin bench --model marlin_vit_base_ytf --iters 3 --peak)
  o+=("$(sed -n 's/^seconds per clip: \([0-9.]*\).*/\1/p' <<<"$r")")
  fpk+=("$(sed -n 's/^f32 FMA peak of .*: \([0-9.]*\) GFLOP.*/\1/p' <<<"$r")")
  bpk+=("$(sed -n 's/^bf16 dot-product peak of .*: \([0-9.]*\) GFLOP.*/\1/p' <<<"$r")")
  gflop=$(sed -n 's/^encoder: \([0-9.]*\) GFLOP per clip.*/\1/p' <<<"$r")
  ob+=("$($bin bench --model marlin_vit_base_ytf --iters 3 --precision bf16 | sed -n 's/^seconds per clip: \([0-9.]*\).*/\1/p')")
  p+=("$(peer_clip --precision fp32)")
  pb+=("$(peer_clip --precision bf16)")
done
ours=$(median "${o[@]}"); ours_bf16=$(median "${ob[@]}"); peer=$(median "${p[@]}"); peer_bf16=$(median "${pb[@]}")
fpeak=$(median "${fpk[@]}"); bpeak=$([ ${#bpk[@]} -gt 0 ] && [ -n "${bpk[0]}" ] && median "${bpk[@]}" || echo 0)
echo "f32 FMA peak $fpeak GFLOP/s; bf16 dot-product peak $bpeak GFLOP/s (0: no AVX-512 BF16); $gflop GFLOP per clip"
rate() { python3 -c "import sys; s, pk = float(sys.argv[1]), float(sys.argv[2]); g = $gflop / s; print(f'{g:.0f} GFLOP/s' + (f', {100 * g / pk:.0f}% of the {sys.argv[3]} peak' if pk > 0 else ''))" "$@"; }
echo "marlin-rs (f32)               $ours s/clip ($(rate "$ours" "$fpeak" f32); rounds: ${o[*]})"
echo "marlin-rs (bf16)              $ours_bf16 s/clip ($(rate "$ours_bf16" "$bpeak" bf16); rounds: ${ob[*]})"
echo "marlin-pytorch (fp32)         $peer s/clip ($(rate "$peer" "$fpeak" f32); rounds: ${p[*]})"
echo "marlin-pytorch (bf16 autocast) $peer_bf16 s/clip ($(rate "$peer_bf16" "$bpeak" bf16); rounds: ${pb[*]})"
python3 -c "b = min($ours, $ours_bf16) / min($peer, $peer_bf16); print(f'best mode (ours / peer): {b:.2f}x')"
python3 -c "print(f'ratio (ours / peer fp32): {$ours / $peer:.2f}x; (ours / peer bf16): {$ours / $peer_bf16:.2f}x; (ours bf16 / peer bf16): {$ours_bf16 / $peer_bf16:.2f}x')"

echo "== 2. end to end, 10 s 30 fps 224x224 video (3 alternating rounds; medians)"
ffmpeg -v error -y -f lavfi -i testsrc2=size=224x224:rate=30 -frames:v 300 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
"$PEER_PY" bench/peer_extract.py --save-weights "$work/vitb.pt" --threads "$threads" >/dev/null
o=(); ob=(); p=(); pb=()
for round in 1 2 3; do
  t0=$(date +%s.%N)
  $bin extract "$work/v.mp4" --weights "$work/vitb.pt" --out "$work/out" --quiet --batch-size 1 --overwrite
  t1=$(date +%s.%N)
  o+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
  t0=$(date +%s.%N)
  $bin extract "$work/v.mp4" --weights "$work/vitb.pt" --out "$work/out" --quiet --batch-size 1 --overwrite --precision bf16
  t1=$(date +%s.%N)
  ob+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
  pb+=("$("$PEER_PY" bench/peer_extract.py --weights "$work/vitb.pt" --video "$work/v.mp4" --threads "$threads" --bf16 | sed -n 's/^peer seconds: //p')")
  p+=("$("$PEER_PY" bench/peer_extract.py --weights "$work/vitb.pt" --video "$work/v.mp4" --threads "$threads" | sed -n 's/^peer seconds: //p')")
done
ours=$(median "${o[@]}"); ours_bf16=$(median "${ob[@]}"); peer=$(median "${p[@]}"); peer_bf16=$(median "${pb[@]}")
echo "marlin extract         $ours s (process start, weights load, decode, 9 clips, write; rounds: ${o[*]})"
echo "marlin extract bf16    $ours_bf16 s (rounds: ${ob[*]})"
echo "peer extract_video     $peer s (weights load, decode, 9 clips; rounds: ${p[*]})"
echo "peer extract_video bf16 $peer_bf16 s (torch.autocast bf16; rounds: ${pb[*]})"
python3 -c "print(f'ratio (ours / peer): {$ours / $peer:.2f}x; bf16 (ours / peer): {$ours_bf16 / $peer_bf16:.2f}x')"
