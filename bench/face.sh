#!/usr/bin/env bash
# Face detection and --crop-face, side by side with the reference detector (facenet-pytorch's
# MTCNN, whose weights we embed), same machine, same thread count, one run; every figure is the
# median of 3 rounds that alternate the programs (or the two settings).
#
#   PEER_PY=/opt/venv/peer/bin/python SAMPLES=../shared/samples bench/face.sh [threads]
#
# 1. Detection frames/s (decode included) on video01.mp4 (480x360, 300 frames) and
#    video02.mp4 (1280x720, 195 frames): `marlin detect` vs MTCNN.detect in batches of 16.
# 2. The cost of --crop-face: `marlin extract` of video01.mp4 with ViT-B (random weights),
#    whole frames resized vs detect + track + crop. (The peer's crop_face clones a detector
#    repository at run time, so it has no offline counterpart.)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
PEER_PY=${PEER_PY:-python3}
SAMPLES=${SAMPLES:-../shared/samples}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
cargo build --release -q
bin=target/release/marlin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"

median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
ours_fps() { $bin detect "$@" -q | sed -n 's/.*, \([0-9.]*\) frames\/s$/\1/p'; }

echo "== 1. detection, frames/s (decode included; 3 alternating rounds, medians)"
for v in video01 video02; do
  o=(); p=()
  for round in 1 2 3; do
    o+=("$(ours_fps "$SAMPLES/$v.mp4")")
    peer_line=$("$PEER_PY" bench/peer_detect.py "$SAMPLES/$v.mp4" --threads "$threads")
    p+=("$(echo "$peer_line" | sed -n 's/^peer frames\/s: \([0-9.]*\).*/\1/p')")
  done
  ours=$(median "${o[@]}"); peer=$(median "${p[@]}")
  echo "$v: marlin-rs $ours frames/s (rounds: ${o[*]}), facenet-pytorch $peer frames/s (rounds: ${p[*]}; last: $peer_line)"
  python3 -c "print(f'$v time ratio (ours / peer): {$peer / $ours:.2f}x')"
done

o=()
for round in 1 2 3; do o+=("$(ours_fps "$SAMPLES/video02.mp4" --detect-max-side 640)"); done
echo "video02 with --detect-max-side 640 (ours only; detection on a 640x360 copy): $(median "${o[@]}") frames/s (rounds: ${o[*]})"

echo "== 2. extract with and without --crop-face, ViT-B, video01.mp4 (300 frames -> 9 clips; 3 alternating rounds, medians)"
"$PEER_PY" bench/peer_extract.py --save-weights "$work/vitb.pt" --threads "$threads" >/dev/null
plain=(); crop=()
for round in 1 2 3; do
  t0=$(date +%s.%N)
  $bin extract "$SAMPLES/video01.mp4" --weights "$work/vitb.pt" --out "$work/plain" --quiet --overwrite
  t1=$(date +%s.%N)
  $bin extract "$SAMPLES/video01.mp4" --weights "$work/vitb.pt" --out "$work/crop" --quiet --overwrite --crop-face
  t2=$(date +%s.%N)
  plain+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")"); crop+=("$(python3 -c "print(f'{$t2 - $t1:.2f}')")")
done
a=$(median "${plain[@]}"); b=$(median "${crop[@]}")
echo "plain extract $a s (rounds: ${plain[*]}), --crop-face $b s (rounds: ${crop[*]})"
python3 -c "print(f'--crop-face costs {$b / $a:.2f}x plain')"
