#!/usr/bin/env python3
"""marlin-pytorch side of the end-to-end GPU benchmark (bench/gpu.sh): a loop of the peer's
`Marlin.extract_video` over frame folders, each result saved as .npy, what a user of the peer
writes. `extract_video` reads a video with `ffmpeg.probe` (frame count) and
`cv2.VideoCapture` (frames, BGR); a machine without FFmpeg or OpenCV gets small stand-ins that
read a folder of JPEGs with torchvision instead (decode, BGR, as OpenCV hands them over), so the
peer runs its own windowing, batching (one clip per forward) and model code unchanged.

  python3 bench/peer_extract_folders.py --weights W.pt --root FOLDERS --out OUT --device cuda --precision tf32
"""
import argparse
import os
import sys
import time
import types

import numpy as np
import torch
from torchvision.io import decode_jpeg, read_file


def jpgs(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jpg"))


class VideoCapture:
    """OpenCV's reader over a frame folder: read() -> (ok, HxWx3 uint8 BGR)."""

    def __init__(self, path):
        self.files = jpgs(path)
        self.i = 0

    def read(self):
        if self.i >= len(self.files):
            return False, None
        img = decode_jpeg(read_file(self.files[self.i]))  # 3xHxW RGB
        self.i += 1
        return True, img.permute(1, 2, 0).numpy()[:, :, ::-1]

    def release(self):
        pass


cv2 = types.ModuleType("cv2")
cv2.VideoCapture = VideoCapture
cv2.COLOR_BGR2RGB = 4
cv2.cvtColor = lambda frame, code: np.ascontiguousarray(frame[:, :, ::-1])
ffmpeg = types.ModuleType("ffmpeg")
ffmpeg.probe = lambda path: {"streams": [{"nb_frames": str(len(jpgs(path)))}]}
sys.modules["cv2"] = cv2
sys.modules["ffmpeg"] = ffmpeg

from marlin_pytorch import Marlin  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--weights", required=True, help="a .pt from bench/peer_extract.py --save-weights")
p.add_argument("--root", required=True)
p.add_argument("--out", required=True)
p.add_argument("--device", default="cuda")
p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
p.add_argument("--limit", type=int)
a = p.parse_args()
torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
os.makedirs(a.out, exist_ok=True)
folders = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
folders = folders[: a.limit] if a.limit else folders

t0 = time.perf_counter()
m = Marlin.from_file("marlin_vit_base_ytf", a.weights).to(a.device)
clips = 0
with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
    for d in folders:
        f = m.extract_video(os.path.join(a.root, d))
        clips += f.shape[0]
        np.save(os.path.join(a.out, d + ".npy"), f.float().cpu().numpy())
torch.cuda.synchronize()
s = time.perf_counter() - t0
print(f"peer end to end: {len(folders)} videos, {clips} clips in {s:.1f} s "
      f"({len(folders) / s:.2f} videos/s, {clips / s:.1f} clips/s; {a.precision})")
