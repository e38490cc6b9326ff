#!/usr/bin/env bash
# extract_video from Python, side by side: marlin_rs (this repo's package, built into a fresh
# venv) vs marlin-pytorch, same machine, same thread count, one run; the `marlin extract` CLI on
# the same input shows what the binding adds. Medians of 3 rounds that alternate the programs.
#
#   PEER_PY=/opt/venv/peer/bin/python bench/python.sh [threads]
#
# Input: a 10 s, 30 fps, 224x224 H.264 video (300 frames -> 9 clips), random ViT-B encoder
# weights in one .pt file read by all three. Each figure: weights load + decode + every clip.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
PEER_PY=${PEER_PY:-python3}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release -q
bin=target/release/marlin
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check maturin numpy
"$work/venv/bin/maturin" build --release --quiet -m python/Cargo.toml -o "$work/wheels"
"$work/venv/bin/pip" install -q --disable-pip-version-check --no-deps "$work"/wheels/marlin_rs-*.whl

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $threads threads; $(date -u +%F)"
median() { python3 -c "import sys, statistics; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }
ffmpeg -v error -y -f lavfi -i testsrc2=size=224x224:rate=30 -frames:v 300 -c:v libx264 -pix_fmt yuv420p "$work/v.mp4"
"$PEER_PY" bench/peer_extract.py --save-weights "$work/vitb.pt" --threads "$threads" >/dev/null
o=(); p=(); c=()
for round in 1 2 3; do
  o+=("$(cd "$work" && "$work/venv/bin/python" "$OLDPWD/bench/ours_python.py" --weights vitb.pt --video v.mp4 | sed -n 's/^ours seconds: \([0-9.]*\).*/\1/p')")
  p+=("$("$PEER_PY" bench/peer_extract.py --weights "$work/vitb.pt" --video "$work/v.mp4" --threads "$threads" | sed -n 's/^peer seconds: //p')")
  t0=$(date +%s.%N)
  $bin extract "$work/v.mp4" --weights "$work/vitb.pt" --out "$work/out" --quiet --overwrite
  t1=$(date +%s.%N)
  c+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
done
ours=$(median "${o[@]}"); peer=$(median "${p[@]}"); cli=$(median "${c[@]}")
echo "marlin_rs extract_video (Python)       $ours s (rounds: ${o[*]})"
echo "marlin-pytorch extract_video (fp32)    $peer s (rounds: ${p[*]})"
echo "marlin extract (CLI, process included) $cli s (rounds: ${c[*]})"
python3 -c "print(f'ratio (marlin_rs / marlin-pytorch): {$ours / $peer:.2f}x; binding vs CLI: {$ours - $cli:+.2f} s ({$ours / $cli:.2f}x)')"
