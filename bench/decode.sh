#!/usr/bin/env bash
# H.264 decoding in-process (OpenH264) against FFmpeg's rgb24 pipe, through `marlin extract`
# with the tiny test model (so decoding is nearly all of the time): 10-second H.264 videos
# (300 frames) at 224x224 (face crops) and 1280x720 (resized to 224 by each decoder), one
# video per run, rounds alternating the decoders; medians. The decoders give the same frames,
# byte for byte (tests: cli_extract::h264_videos_extract_without_ffmpeg_as_with_it).
#
#   bench/decode.sh [rounds]        (MARLIN_BIN=path/to/marlin times that build)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
if [ -z "${MARLIN_BIN:-}" ]; then cargo build --release -q; fi
bin=${MARLIN_BIN:-$PWD/target/release/marlin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
f=tests/fixtures/video
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u +%F); $(ffmpeg -version | head -1)"
for size in 224x224 1280x720; do
  ffmpeg -v error -y -f lavfi -i "testsrc2=size=$size:rate=30" -frames:v 300 -c:v libx264 -pix_fmt yuv420p "$work/v$size.mp4"
done
median() { python3 -c "import sys, statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }
secs() {
  local t0 t1
  t0=$(date +%s.%N)
  env MARLIN_DECODER="$1" "$bin" extract "$2" --config $f/tiny224.yaml --weights $f/tiny224.pt \
    --out "$work/out" --overwrite --quiet
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
for size in 224x224 1280x720; do
  a=(); b=()
  for _ in $(seq "$rounds"); do
    a+=("$(secs openh264 "$work/v$size.mp4")")
    b+=("$(secs ffmpeg "$work/v$size.mp4")")
  done
  ma=$(median "${a[@]}"); mb=$(median "${b[@]}")
  echo "$size, 300 frames: in-process $ma s (rounds: ${a[*]}); FFmpeg pipe $mb s (rounds: ${b[*]}); in-process / FFmpeg $(python3 -c "print(f'{$ma / $mb:.2f}')")"
done
