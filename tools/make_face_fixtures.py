#!/usr/bin/env python3
"""Face-detection fixtures: small public-domain images and facenet-pytorch 2.6's MTCNN
detections on them (boxes, scores, 5 landmarks), for tests/face_detect.rs.

    /opt/venv/peer/bin/python tools/make_face_fixtures.py

Images (tests/fixtures/face/*.png), all from scikit-image's `astronaut` sample (NASA portrait
of Eileen Collins, public domain):
  astronaut256.png  the portrait at 256x256 (one large face)
  two_faces.png     480x270 gradient canvas with the portrait at 150 px and, mirrored, at 60 px
  no_face.png       160x120 gradient only (no detection expected)
Expected output (tests/fixtures/face/detections.json): for each image, facenet-pytorch's
`detect_face` with MTCNN's defaults (min_face_size 20, thresholds 0.6/0.7/0.7, factor 0.709),
faces best score first: bbox [x1, y1, x2, y2], score, landmarks [[x, y] x 5].
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import detect_face
from skimage import data

root = Path(__file__).resolve().parent.parent
out = root / "tests/fixtures/face"
out.mkdir(parents=True, exist_ok=True)

astro = Image.fromarray(data.astronaut())


def gradient(w, h):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 120 * x / w, 60 + 80 * y / h, 150 - 60 * x / w], axis=-1)
    return Image.fromarray(img.astype(np.uint8))


images = {"astronaut256": astro.resize((256, 256), Image.BILINEAR)}
canvas = gradient(480, 270)
canvas.paste(astro.resize((150, 150), Image.BILINEAR), (300, 60))
canvas.paste(astro.resize((60, 60), Image.BILINEAR).transpose(Image.FLIP_LEFT_RIGHT), (60, 150))
images["two_faces"] = canvas
images["no_face"] = gradient(160, 120)

mtcnn = MTCNN(keep_all=True, device="cpu")
expected = {}
for name, img in images.items():
    img.save(out / f"{name}.png", optimize=True)
    arr = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
    with torch.no_grad():
        boxes, points = detect_face(arr, mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet, mtcnn.onet,
                                    mtcnn.thresholds, mtcnn.factor, "cpu")
    faces = []
    for b, p in zip(boxes[0], points[0]):
        faces.append({"bbox": [float(v) for v in b[:4]], "score": float(b[4]),
                      "landmarks": [[float(x), float(y)] for x, y in p]})
    faces.sort(key=lambda f: -f["score"])
    expected[name] = faces
    print(name, arr.shape, [(f["bbox"], round(f["score"], 4)) for f in faces])

(out / "detections.json").write_text(json.dumps(expected, indent=1) + "\n")
