#!/usr/bin/env python3
"""facenet-pytorch MTCNN (the reference for our detector) over a video, frames/s: PyAV decodes
rgb24 frames, batches of 16 go through MTCNN.detect with its defaults; decoding is inside the
timed loop, as it is in `marlin detect`. Model construction is outside it."""
import argparse
import time

import av
import torch
from facenet_pytorch import MTCNN

ap = argparse.ArgumentParser()
ap.add_argument("video")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch", type=int, default=16)
a = ap.parse_args()
torch.set_num_threads(a.threads)
m = MTCNN(keep_all=True, device="cpu")
n = found = 0
t = time.perf_counter()
with av.open(a.video) as c:
    batch = []
    frames = c.decode(video=0)
    while True:
        f = next(frames, None)
        if f is not None:
            batch.append(f.to_ndarray(format="rgb24"))
        if batch and (f is None or len(batch) == a.batch):
            boxes, _ = m.detect(batch)
            n += len(batch)
            found += sum(b is not None for b in boxes)
            batch = []
        if f is None:
            break
dt = time.perf_counter() - t
print(f"peer frames/s: {n / dt:.2f} ({found} of {n} frames with a face)")
