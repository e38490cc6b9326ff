#!/usr/bin/env bash
# The face parser's cost, side by side with the runtime MediaPipe runs the same networks with,
# same machine, same thread count, one run; every figure is the median of 3 rounds that
# alternate the programs.
#
#   PEER_PY=/path/to/venv/bin/python MEDIAPIPE_WHEEL=mediapipe-0.10.14-*.whl \
#     SAMPLES=../shared/samples bench/parser.sh [threads]
#
# PEER_PY needs ai-edge-litert, numpy and pillow; the wheel is `pip download --no-deps
# mediapipe==0.10.14`.
# 1. Ours: `marlin prepare` of cropped01.mp4 (143 frames) with --parser mesh and --parser
#    template; the difference over the frames is the mesh parser's cost per frame (two mesh
#    passes, the person mask, the label map; detection, crops and writes are the same in both).
# 2. Peer: bench/peer_parser.py, the same three network runs per frame in LiteRT (XNNPACK).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
PEER_PY=${PEER_PY:-python3}
SAMPLES=${SAMPLES:-../shared/samples}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
cargo build --release -q
bin=target/release/marlin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
video=$SAMPLES/cropped01.mp4
frames=$(ffprobe -v error -select_streams v:0 -count_frames -show_entries stream=nb_read_frames -of csv=p=0 "$video")
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
m=(); t=(); p=()
for round in 1 2 3; do
  rm -rf "$work"/*
  m+=("$(secs $bin prepare "$video" --out "$work/mesh" -q)")
  t+=("$(secs $bin prepare "$video" --out "$work/template" --parser template -q)")
  line=$("$PEER_PY" bench/peer_parser.py "$video" --wheel "$MEDIAPIPE_WHEEL" --threads "$threads")
  p+=("$(echo "$line" | sed -n 's/^peer ms\/frame: \([0-9.]*\).*/\1/p')")
done
mesh=$(median "${m[@]}"); tmpl=$(median "${t[@]}"); peer=$(median "${p[@]}")
echo "prepare $frames frames: --parser mesh $mesh s (rounds: ${m[*]}), --parser template $tmpl s (rounds: ${t[*]})"
python3 - <<PY
ours = 1e3 * ($mesh - $tmpl) / $frames
print(f"mesh parser: {ours:.1f} ms/frame; LiteRT, the same networks: $peer ms/frame (rounds: ${p[*]})")
print(f"time ratio (ours / peer): {ours / $peer:.2f}x")
PY
