#!/usr/bin/env python3
"""Detector parity on real frames: facenet-pytorch 2.6's `detect_face` (MTCNN defaults:
min_face_size 20, thresholds 0.6/0.7/0.7, factor 0.709) on 12 evenly spaced frames of each
shared sample video, for tests/suite/face_samples.rs. Needs the ffmpeg program and the venv of
make_face_fixtures.py (facenet-pytorch installed with --no-deps, see convert_mtcnn_weights.py):

    /opt/venv/peer/bin/python tools/make_face_sample_fixtures.py ../shared/samples

Frames are decoded by the same ffmpeg command marlin-rs runs (rgb24, passthrough timing), so
both detectors see the same pixels; each frame's checksums (sum of bytes, and sum of
byte * (i % 65521 + 1)) are stored so the test can tell a decoding difference from a detection
difference. Output: tests/fixtures/face/sample_detections.json, per video its frame count and
per chosen frame the faces (best score first): bbox [x1, y1, x2, y2], score, landmarks.

O-Net's scores saturate (several candidates at exactly 1.0 in float32), and detect_face's last
NMS picks among equal scores by `np.argsort`, which is not stable where numpy uses the CPU's
SIMD sort (AVX-512): which of the tied candidates the peer returns depends on the machine. So
each frame is detected twice: as the peer runs (`faces`) and with that one argsort stable
(`faces_stable`, numpy's own result on a CPU without the SIMD sort), which is the rule
marlin-rs follows; the test asserts equality with the latter and that the former differs only
among equal scores.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils import detect_face as detect_face_module
from facenet_pytorch.models.utils.detect_face import detect_face

VIDEOS = ["video01.mp4", "video02.mp4", "cropped01.mp4", "cropped02.mp4"]
PER_VIDEO = 12


def size(path: Path):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=width,height", "-of", "json", str(path)],
                         check=True, capture_output=True).stdout
    s = json.loads(out)["streams"][0]
    return s["width"], s["height"]


def frames(path: Path):
    w, h = size(path)
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-vsync", "passthrough", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def checksums(frame: np.ndarray):
    b = frame.reshape(-1).astype(np.uint64)
    weights = (np.arange(b.size, dtype=np.uint64) % np.uint64(65521)) + np.uint64(1)
    return [int(b.sum()), int((b * weights).sum())]


class StableArgsort:
    """numpy, but argsort is stable (for detect_face's nms_numpy)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def argsort(a, *args, **kwargs):
        return np.argsort(a, kind="stable")


def detect(mtcnn, frame, stable: bool):
    detect_face_module.np = StableArgsort() if stable else np
    with torch.no_grad():
        boxes, points = detect_face(frame.copy(), mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet,
                                    mtcnn.onet, mtcnn.thresholds, mtcnn.factor, "cpu")
    detect_face_module.np = np
    faces = [{"bbox": [float(v) for v in b[:4]], "score": float(b[4]),
              "landmarks": [[float(x), float(y)] for x, y in p]}
             for b, p in zip(boxes[0], points[0])]
    return sorted(faces, key=lambda f: -f["score"])


def main(samples: Path, out: Path):
    mtcnn = MTCNN(keep_all=True, device="cpu")
    result = {"detector": "facenet-pytorch 2.6.0 detect_face", "videos": {}}
    for name in VIDEOS:
        video = frames(samples / name)
        n = len(video)
        picks = sorted({round(k * (n - 1) / (PER_VIDEO - 1)) for k in range(PER_VIDEO)})
        per_frame = {}
        for i in picks:
            per_frame[str(i)] = {"checksums": checksums(video[i]),
                                 "faces": detect(mtcnn, video[i], stable=False),
                                 "faces_stable": detect(mtcnn, video[i], stable=True)}
        result["videos"][name] = {"frames": n, "detections": per_frame}
        print(name, n, "frames;", {i: len(f["faces"]) for i, f in per_frame.items()},
              "tie picks differ:", [i for i, f in per_frame.items() if f["faces"] != f["faces_stable"]])
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    main(Path(sys.argv[1] if len(sys.argv) > 1 else root.parent / "shared/samples"),
         root / "tests/fixtures/face/sample_detections.json")
