#!/usr/bin/env python3
"""Make the video fixtures of marlin-rs with the peer, marlin-pytorch (see make_model_fixtures.py
for the venv). Needs the ffmpeg program.

    /opt/venv/peer/bin/python tools/make_video_fixtures.py tests/fixtures/video

1. Encodes moving test patterns with FFmpeg: H.264 at 10, 16, 20, 32, 33, 100 and 143 frames,
   MPEG-4 Part 2 ('mp4v', what the reference's cropper writes) at 20 and 100 frames, and a
   folder of 40 PNG frames. 224x224 (the peer accepts nothing else).
2. Builds a tiny 224-px MARLIN (every parameter perturbed) and saves it as tiny224.pt.
3. Runs the peer's `extract_video` on each video (defaults sample_rate=2, stride=16; plus
   keep_seq, mean and max, and sample_rate=1/stride=8 on some) and saves the outputs.
   The peer cannot read frame folders: their expected features are the peer's
   `extract_features` on clips built from the PNGs with the windowing rules of the notes.

torchvision >= 0.22 has no io.read_video; it is patched here with PyAV's rgb24 frames, which is
what it returned.
"""
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import save_file

from marlin_pytorch import Marlin


def read_video_pyav(path, *args, **kwargs):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return torch.from_numpy(np.stack(frames)), torch.zeros(0), {}


torchvision.io.read_video = read_video_pyav

CFG = {
    "model_name": "tiny224", "img_size": 224, "patch_size": 16, "clip_frames": 16, "tubelet_size": 2,
    "mlp_ratio": 4.0, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "norm_layer": "LayerNorm", "init_values": 0.0,
    "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 4},
    "decoder": {"embed_dim": 16, "depth": 1, "num_heads": 2},
}


def encode(out: Path, frames: int, codec: str, pattern: str):
    args = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
            f"{pattern}=size=224x224:rate=25,hue=H=t*2", "-frames:v", str(frames)]
    if codec == "h264":
        args += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "32", "-pix_fmt", "yuv420p"]
    else:
        args += ["-c:v", "mpeg4", "-tag:v", "mp4v", "-q:v", "12"]
    subprocess.run(args + [str(out)], check=True)


def fnv1a64(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    # Small, dependency-free hash; tests/suite/extract_parity.rs computes the same.
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def frame_hashes(path: str):
    """FNV-1a of all rgb24 frames as PyAV (the peer's short-video path) and OpenCV (its
    sliding-window path) decode them."""
    import cv2
    with av.open(path) as c:
        pyav = b"".join(f.to_ndarray(format="rgb24").tobytes() for f in c.decode(video=0))
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB).tobytes())
    return {"pyav": f"{fnv1a64(pyav):016x}", "opencv": f"{fnv1a64(b''.join(frames)):016x}",
            "frames": len(frames)}


def windows(n, t=16, s=2, stride=16):
    if n <= t:
        return [[min(i, n - 1) for i in range(t)]]
    if n <= t * s:
        return [list(range(t))]
    return [[start + k * s for k in range(t)] for start in range(0, n - t * s, stride * s)]


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    videos = {}
    for n in [10, 16, 20, 32, 33, 100, 143]:
        videos[f"h264_{n}.mp4"] = (n, "h264", "testsrc2")
    for n in [20, 100]:
        videos[f"mpeg4_{n}.mp4"] = (n, "mpeg4", "mandelbrot")
    for name, (n, codec, pattern) in videos.items():
        encode(out / name, n, codec, pattern)
    frames_dir = out / "frames_40"
    frames_dir.mkdir(exist_ok=True)
    tmp = out / "_frames.mp4"
    encode(tmp, 40, "h264", "testsrc")
    with av.open(str(tmp)) as c:
        for i, f in enumerate(c.decode(video=0)):
            Image.fromarray(f.to_ndarray(format="rgb24")).save(frames_dir / f"{i + 1}.png", optimize=True)
    tmp.unlink()

    torch.manual_seed(7)
    (out / "tiny224.yaml").write_text(yaml.safe_dump(CFG, sort_keys=False))
    model = Marlin(
        img_size=224, patch_size=16, n_frames=16, encoder_embed_dim=32, encoder_depth=2,
        encoder_num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
        mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
        norm_layer="LayerNorm", init_values=0.0, tubelet_size=2, as_feature_extractor=True,
    ).eval()
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.add_(0.2 * torch.randn_like(p))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "tiny224.pt")

    expected, manifest = {}, {"peer": "marlin-pytorch 0.3.4", "cases": {}}

    def record(key, feats, **meta):
        expected[key] = feats.contiguous().float()
        manifest["cases"][key] = {"shape": list(feats.shape), **meta}
        print(key, tuple(feats.shape))

    for name in videos:
        path = str(out / name)
        record(f"{name}|sr2_s16", model.extract_video(path), video=name, sample_rate=2, stride=16)
    record("h264_33.mp4|sr2_s16|seq", model.extract_video(str(out / "h264_33.mp4"), keep_seq=True),
           video="h264_33.mp4", sample_rate=2, stride=16, keep_seq=True)
    record("h264_143.mp4|sr2_s16|mean", model.extract_video(str(out / "h264_143.mp4"), reduction="mean"),
           video="h264_143.mp4", sample_rate=2, stride=16, reduction="mean")
    record("mpeg4_100.mp4|sr2_s16|max", model.extract_video(str(out / "mpeg4_100.mp4"), reduction="max"),
           video="mpeg4_100.mp4", sample_rate=2, stride=16, reduction="max")
    record("h264_100.mp4|sr1_s8", model.extract_video(str(out / "h264_100.mp4"), sample_rate=1, stride=8),
           video="h264_100.mp4", sample_rate=1, stride=8)

    frames = [np.asarray(Image.open(frames_dir / f"{i + 1}.png").convert("RGB")) for i in range(40)]
    clips = []
    for w in windows(len(frames)):
        v = torch.from_numpy(np.stack([frames[i] for i in w])).permute(3, 0, 1, 2).float() / 255
        clips.append(model.extract_features(v.unsqueeze(0), keep_seq=False))
    record("frames_40|sr2_s16", torch.cat(clips), video="frames_40", sample_rate=2, stride=16)

    manifest["frame_hashes"] = {name: frame_hashes(str(out / name))
                                for name in ["h264_33.mp4", "mpeg4_20.mp4"]}
    save_file(expected, str(out / "expected.safetensors"))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/video"))
