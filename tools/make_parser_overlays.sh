#!/usr/bin/env bash
# docs/parsers.png: both face parsers on the public-domain portrait of the bundled sample
# (tests/fixtures/face/astronaut256.png), as it is, turned 30 degrees and mirrored. Per input a
# column pair: labels over the crop | Fasking mask at 0.9 (masked patches dimmed); the top row is
# the mesh parser, the bottom row the 5-point template.
#
#   tools/make_parser_overlays.sh [out.png]
#
# With SAMPLES=../shared/samples it also draws the hand-labelled frames of
# tests/fixtures/face/parse_labels.json into docs/samples/ (not committed: the samples' license
# keeps them out of the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/parsers.png}
cargo build --release -q
bin=target/release/marlin
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=tests/fixtures/face/astronaut256.png
cp "$src" "$work/plain.png"
ffmpeg -v error -y -i "$src" -vf "rotate=30*PI/180:fillcolor=black" "$work/turned.png"
ffmpeg -v error -y -i "$src" -vf hflip "$work/mirrored.png"
panels=()
for name in plain turned mirrored; do
  $bin parse "$work/$name.png" --parser both --draw "$work/$name.draw.png" >/dev/null
  # Drop the first column (the bare crop): labels | Fasking, two rows.
  ffmpeg -v error -y -i "$work/$name.draw.png" -vf "crop=448:448:224:0" "$work/$name.cols.png"
  panels+=(-i "$work/$name.cols.png")
done
ffmpeg -v error -y "${panels[@]}" -filter_complex "hstack=inputs=3" "$out"
echo "wrote $out"
if [ -n "${SAMPLES:-}" ]; then
  mkdir -p docs/samples
  python3 - "$SAMPLES" <<'PY' | while read -r name input frame rotate; do
import json, sys
for c in json.load(open("tests/fixtures/face/parse_labels.json"))["cases"]:
    print(c["name"], c["input"], c["frame"], c["rotate"])
PY
    path=$SAMPLES/$input
    if [ "$rotate" != 0 ]; then
      ffmpeg -nostdin -v error -y -i "$path" -vf "select=eq(n\,$frame),rotate=$rotate*PI/180:fillcolor=black" -frames:v 1 "$work/$name.png"
      path=$work/$name.png; frame=0
    fi
    $bin parse "$path" --frame "$frame" --parser both --draw "docs/samples/$name.png" </dev/null >/dev/null
  done
  echo "wrote docs/samples/"
fi
