#!/usr/bin/env python3
"""Synthetic videos as frame folders of JPEGs, for the end-to-end GPU benchmark (bench/gpu.sh):
a machine with torch and torchvision but no FFmpeg can make and read them, and both sides
decode the same files (marlin-rs with the `image` crate, marlin-pytorch through the frame-folder
shim of bench/peer_extract_folders.py).

  python3 bench/make_frame_videos.py OUT --videos 500 --frames 300 --size 224
  python3 bench/make_frame_videos.py OUT --videos 20 --frames 300 --hd --face tests/fixtures/face/astronaut256.png

Plain videos: smooth random textures drifting a pixel per frame (JPEG sizes like real footage,
not noise). --hd: 1280x720 frames with the face image drifting over a textured background, for
`--crop-face`."""
import argparse
import os
from multiprocessing import Pool

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg, read_image, write_file


def texture(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 9, 9, generator=g)
    return (F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
            .clamp(0, 1)[0] * 255).to(torch.uint8)


def make(job):
    out, i, frames, size, hd, face = job
    d = os.path.join(out, f"v{i:04d}")
    os.makedirs(d, exist_ok=True)
    torch.set_num_threads(1)
    if hd:
        h, w = 720, 1280
        bg = texture(i, h + frames, w + frames)
        f = read_image(face)[:3]
        fh, fw = f.shape[1:]
    else:
        h = w = size
        bg = texture(i, h + frames, w + frames)
    for t in range(frames):
        img = bg[:, t:t + h, t:t + w].clone()
        if hd:
            y, x = 200 + (t % 60), 400 + 2 * (t % 90)
            img[:, y:y + fh, x:x + fw] = f
        write_file(os.path.join(d, f"{t:05d}.jpg"), encode_jpeg(img, quality=90))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--hd", action="store_true")
    p.add_argument("--face")
    p.add_argument("--procs", type=int, default=os.cpu_count())
    a = p.parse_args()
    jobs = [(a.out, i, a.frames, a.size, a.hd, a.face) for i in range(a.videos)]
    with Pool(a.procs) as pool:
        pool.map(make, jobs)


if __name__ == "__main__":
    main()
