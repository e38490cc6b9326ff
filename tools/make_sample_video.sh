#!/usr/bin/env bash
# Make assets/sample_face.mp4 from NASA's public-domain portrait of astronaut Eileen Collins,
# as shipped by scikit-image (skimage.data.astronaut). Needs python3 with scikit-image and
# Pillow, and ffmpeg.
set -euo pipefail
tmp=$(mktemp -d)
python3 - "$tmp" <<'PY'
import sys
from PIL import Image
from skimage import data
im = Image.fromarray(data.astronaut())
im.crop((125, 0, 365, 240)).resize((448, 448), Image.BICUBIC).save(f"{sys.argv[1]}/face.png")
PY
ffmpeg -v error -y -loop 1 -i "$tmp/face.png" \
  -vf "zoompan=z='1+0.004*on':x='iw/2-(iw/zoom/2)+8*sin(on/6)':y='ih/2-(ih/zoom/2)+4*cos(on/7)':d=48:s=224x224:fps=25,format=yuv420p" \
  -frames:v 48 -c:v libx264 -preset slow -crf 26 -movflags +faststart assets/sample_face.mp4
rm -r "$tmp"
