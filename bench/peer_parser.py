#!/usr/bin/env python3
"""The face parser's networks in the runtime the `mediapipe` package runs them with (TensorFlow
Lite / LiteRT with XNNPACK), on every frame of a face video: what `marlin prepare`'s mesh parser
runs per frame (the face mesh twice, on the detector's region and on the region of its own first
landmarks, and the selfie person mask once), inputs resized from the frame with PIL.

    python bench/peer_parser.py VIDEO --wheel mediapipe-0.10.14-*.whl [--threads 2]

Prints `peer ms/frame: X` (median of the frames' times after 5 warm-up frames).
"""
import argparse
import statistics
import subprocess
import time
import zipfile

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("video")
ap.add_argument("--wheel", required=True)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()

wheel = zipfile.ZipFile(a.wheel)


def net(path):
    it = Interpreter(model_content=wheel.read(path), num_threads=a.threads)
    it.allocate_tensors()
    return it, it.get_input_details()[0]["index"], [d["index"] for d in it.get_output_details()]


mesh = net("mediapipe/modules/face_landmark/face_landmark.tflite")
selfie = net("mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite")
probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                        "stream=width,height", "-of", "csv=p=0", a.video],
                       capture_output=True, text=True, check=True).stdout.strip().split(",")
w, h = int(probe[0]), int(probe[1])
raw = subprocess.run(["ffmpeg", "-v", "error", "-i", a.video, "-f", "rawvideo", "-pix_fmt", "rgb24",
                      "-"], capture_output=True, check=True).stdout
frames = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def run(n, img, size):
    it, i, outs = n
    x = np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)[None] / 255.0
    it.set_tensor(i, x)
    it.invoke()
    return [it.get_tensor(o) for o in outs]


times = []
for k, f in enumerate(frames):
    t = time.perf_counter()
    img = Image.fromarray(f)
    run(mesh, img, 192)
    run(mesh, img, 192)
    run(selfie, img, 256)
    times.append(time.perf_counter() - t)
times = times[5:]
print(f"peer ms/frame: {1e3 * statistics.median(times):.2f} ({len(times)} frames, "
      f"{a.threads} threads)")
