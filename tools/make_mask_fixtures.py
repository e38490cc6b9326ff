#!/usr/bin/env python3
"""Masking fixtures: a Python implementation of the masking described in
../shared/MARLIN_NOTES.md ("Fasking"), run on synthetic face-parsing maps with numpy's random
draws recorded, for tests/suite/masking.rs. The Rust test replays the same draws and must produce
the same masks.

    /opt/venv/peer/bin/python tools/make_mask_fixtures.py

Parsing maps (tests/fixtures/masking/parsing_<t>.png, 224x224, grey value = LaPa label 0..10):
a drawn face (skin ellipse, hair cap, brows, eyes, nose, lips, inner mouth) that drifts and
grows over the 8 tubelet-first frames; frame 5 is an empty map ("no parsed face").
Draws recorded per case: the keep-queue permutation of the five components (fasking,
fasking_opp), and each trimming step's indices, as positions in the list of visible indices.
"""
import json
from math import ceil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

root = Path(__file__).resolve().parent.parent
out = root / "tests/fixtures/masking"
out.mkdir(parents=True, exist_ok=True)
S, P, T = 224, 16, 8  # image, patch, tubelets
G = S // P

GROUPS = [[2, 4], [3, 5], [6], [7, 8, 9], [10], [1], [0]]


def face_map(t):
    im = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(im)
    cx, cy, r = 100 + 4 * t, 118 + 2 * t, 62 + 3 * t
    d.ellipse([cx - r - 6, cy - r - 24, cx + r + 6, cy + r // 3], fill=10)  # hair
    d.ellipse([cx - r, cy - r, cx + r, cy + r + 10], fill=1)  # skin
    for sx, brow, eye in ((-1, 2, 4), (1, 3, 5)):
        ex = cx + sx * r // 2.4
        d.rectangle([ex - 16, cy - 30, ex + 16, cy - 25], fill=brow)
        d.ellipse([ex - 12, cy - 18, ex + 12, cy - 8], fill=eye)
    d.polygon([(cx, cy - 10), (cx - 10, cy + 22), (cx + 10, cy + 22)], fill=6)  # nose
    d.rectangle([cx - 22, cy + 34, cx + 22, cy + 40], fill=7)
    d.rectangle([cx - 20, cy + 41, cx + 20, cy + 44], fill=8)
    d.rectangle([cx - 22, cy + 45, cx + 22, cy + 51], fill=9)
    return np.asarray(im, dtype=np.uint8)


maps = []
for t in range(T):
    m = face_map(t) if t != 5 else np.zeros((0, 0), np.uint8)
    maps.append(m)
    Image.fromarray(m if m.size else np.zeros((S, S), np.uint8)).save(out / f"parsing_{t}.png", optimize=True)


def maxpool(b):
    return b.reshape(G, P, G, P).max(axis=(1, 3))


def tubelet_mask(m, queue, target):
    """1 = visible. Walk the keep queue label by label; stop once the visible share >= target."""
    vis = np.zeros((G, G), np.float32)
    if queue is None:
        return np.ones((G, G), np.float32)
    if m.size == 0:
        return np.ones((G, G), np.float32)
    for g in queue:
        for v in GROUPS[g]:
            vis = np.maximum(vis, maxpool((m == v).astype(np.float32)))
            if vis.mean() >= target:
                return vis
    return vis


def trim(mask, keep, rng, draws):
    vis = np.flatnonzero(mask)
    drop = rng.choice(len(vis), len(vis) - keep, replace=False)
    draws.append(sorted(int(i) for i in drop))
    mask = mask.copy()
    mask[vis[drop]] = False
    return mask


def make(strategy, ratio, seed):
    rng = np.random.default_rng(seed)
    target = 1 - ratio
    draws = {"permutation": None, "trims": []}
    if strategy == "fasking":
        perm = rng.permutation(5)
        queue = [6, 5] + list(perm)
    elif strategy == "fasking_opp":
        perm = rng.permutation(5)
        queue = list(perm) + [5, 6]
    else:
        perm, queue = None, None
    if perm is not None:
        draws["permutation"] = [int(p) for p in perm]
    masks = np.stack([tubelet_mask(m, queue, target) for m in maps])  # [T, G, G]
    if strategy == "tube":
        first = masks[0].ravel() > 0
        first = trim(first, ceil(len(first) * target), rng, draws["trims"])
        flat = np.tile(first, T)
    elif strategy == "frame":
        frames = np.ones(T, bool)
        frames = trim(frames, ceil(T * target), rng, draws["trims"])
        flat = np.repeat(frames, G * G)
    else:
        flat = masks.ravel() > 0
    flat = trim(flat, int(len(flat) * target), rng, draws["trims"])
    return {"strategy": strategy, "mask_ratio": ratio, "seed": seed, "draws": draws,
            "visible": [int(i) for i in np.flatnonzero(flat)]}


cases = [make(s, r, seed) for s in ("fasking", "fasking_opp", "random", "tube", "frame")
         for r, seed in ((0.9, 1), (0.75, 2))]
(out / "masks.json").write_text(json.dumps({"image": S, "patch": P, "tubelets": T, "no_face": [5],
                                            "cases": cases}) + "\n")
for c in cases:
    print(c["strategy"], c["mask_ratio"], len(c["visible"]), c["draws"]["permutation"])
