#!/usr/bin/env python3
"""Face-detection fixtures: small public-domain images and facenet-pytorch 2.6's MTCNN
detections on them (boxes, scores, 5 landmarks), for tests/suite/face_detect.rs.

    /opt/venv/peer/bin/python tools/make_face_fixtures.py

Images (tests/fixtures/face/*.png), all from scikit-image's `astronaut` sample (NASA portrait
of Eileen Collins, public domain):
  astronaut256.png  the portrait at 256x256 (one large face)
  two_faces.png     480x270 gradient canvas with the portrait at 150 px and, mirrored, at 60 px
  no_face.png       160x120 gradient only (no detection expected)
Reference crops (tests/fixtures/face/crop_<image>.png): marlin-pytorch's own crop of the
largest face (its `crop_with_padding` around the box centre, half side int(max(w, h) / 2), zero
padding, then `cv2.resize` to 224x224, as FaceXZooFaceDetector.crop_face does with its box).
Expected output (tests/fixtures/face/detections.json): for each image, facenet-pytorch's
`detect_face` with MTCNN's defaults (min_face_size 20, thresholds 0.6/0.7/0.7, factor 0.709),
faces best score first: bbox [x1, y1, x2, y2], score, landmarks [[x, y] x 5].
"""
import json
from pathlib import Path

import cv2
import numpy as np
from marlin_pytorch.util import crop_with_padding
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
    if faces:
        x1, y1, x2, y2 = max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))["bbox"]
        x, y = int((x1 + x2) / 2), int((y1 + y2) / 2)
        m = int(max(abs(x2 - x1), abs(y2 - y1)) / 2)
        crop = cv2.resize(crop_with_padding(arr, x - m, x + m, y - m, y + m, 0), (224, 224))
        Image.fromarray(crop).save(out / f"crop_{name}.png", optimize=True)
    expected[name] = faces
    print(name, arr.shape, [(f["bbox"], round(f["score"], 4)) for f in faces])

(out / "detections.json").write_text(json.dumps(expected, indent=1) + "\n")
