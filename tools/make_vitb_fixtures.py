#!/usr/bin/env python3
"""Peer parity at the released width: a ViT-B-wide MARLIN encoder (768 wide, 12 heads of 64,
1568 tokens, 2 blocks instead of 12) whose every weight comes from a formula, so both sides
build the same model and no large weights file is committed. Needs marlin-pytorch, torch and
the ffmpeg program (see make_model_fixtures.py for the venv), and the shared sample videos:

    /opt/venv/peer/bin/python tools/make_vitb_fixtures.py ../shared/samples

The formula (tests/suite/vitb_parity.rs computes the same): for the parameter named `key` and its
flat element index i (row-major, PyTorch layout),
    z = splitmix64(fnv1a64(key) + (i + 1) * 0x9E3779B97F4A7C15)       (64-bit wrapping)
    k = (z >> 48) - 32768                                               (a 16-bit integer)
    value = offset + k * 2^-e
with (offset, e) = (1, 17) for LayerNorm weights, (0, 18) for biases (q_bias, v_bias too) and
(0, 19) for every other weight; the position table stays the fixed sin-cos table. Every value
is exact in float32, so both sides hold bit-identical weights. The input clips use the same
formula under the key "input" with value = (z >> 48) / 65536, in [0, 1).

Writes tests/fixtures/model/vitb2.yaml and vitb2.io.safetensors:
  features       [2, 768]        extract_features(clips, keep_seq=False)
  seq_rows       [2, 32, 768]    extract_features(clips, keep_seq=True) at tokens 0, 49, ..., 1519
  cropped01.mp4  [clips, 768]    extract_video(samples/cropped01.mp4) (defaults: rate 2, stride 16)
  cropped02.mp4  [clips, 768]    extract_video(samples/cropped02.mp4)
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from marlin_pytorch import Marlin
from safetensors.torch import save_file

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
CFG = {
    "model_name": "vitb2", "img_size": 224, "patch_size": 16, "clip_frames": 16, "tubelet_size": 2,
    "mlp_ratio": 4.0, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "norm_layer": "LayerNorm", "init_values": 0.0,
    "encoder": {"embed_dim": 768, "depth": 2, "num_heads": 12},
    "decoder": {"embed_dim": 384, "depth": 1, "num_heads": 6},
}
SEQ_ROWS = list(range(0, 1568, 49))


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def draws(key: str, n: int) -> np.ndarray:
    """16-bit integers in [0, 65536) of the formula, as int64."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(key.encode())) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(48)).astype(np.int64)


def param(key: str, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    k = (draws(key, n) - 32768).astype(np.float32)
    if "norm" in key and key.endswith(".weight"):
        v = np.float32(1.0) + k * np.float32(2.0 ** -17)
    elif key.endswith("bias"):
        v = k * np.float32(2.0 ** -18)
    else:
        v = k * np.float32(2.0 ** -19)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def formula_model_and_clips():
    """The formula model (eval mode) and the two formula input clips [2, 3, 16, 224, 224]."""
    e, d = CFG["encoder"], CFG["decoder"]
    model = Marlin(
        img_size=224, patch_size=16, n_frames=16, encoder_embed_dim=e["embed_dim"],
        encoder_depth=e["depth"], encoder_num_heads=e["num_heads"],
        decoder_embed_dim=d["embed_dim"], decoder_depth=d["depth"], decoder_num_heads=d["num_heads"],
        mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
        norm_layer="LayerNorm", init_values=0.0, tubelet_size=2, as_feature_extractor=True,
    ).eval()
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if key.endswith("pos_embedding.emb"):
                continue
            p.copy_(param(key, tuple(p.shape)))
    n = 2 * 3 * 16 * 224 * 224
    clips = torch.from_numpy((draws("input", n).astype(np.float32) / np.float32(65536.0))
                             .reshape(2, 3, 16, 224, 224))
    return model, clips


def main(samples: Path, out: Path):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    (out / "vitb2.yaml").write_text(yaml.safe_dump(CFG, sort_keys=False))
    model, clips = formula_model_and_clips()
    arrays = {}
    with torch.no_grad():
        arrays["features"] = model.extract_features(clips, keep_seq=False)
        seq = model.extract_features(clips, keep_seq=True)
        arrays["seq_rows"] = seq[:, SEQ_ROWS, :]
        for name in ["cropped01.mp4", "cropped02.mp4"]:
            arrays[name] = model.extract_video(str(samples / name))
    for k, v in arrays.items():
        print(k, tuple(v.shape), float(v.abs().max()))
    save_file({k: v.contiguous().float() for k, v in arrays.items()}, str(out / "vitb2.io.safetensors"))
    manifest = {"peer": "marlin-pytorch 0.3.4", "torch": torch.__version__, "seq_rows": SEQ_ROWS,
                "shapes": {k: list(v.shape) for k, v in arrays.items()}}
    (out / "vitb2.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    main(Path(sys.argv[1] if len(sys.argv) > 1 else root.parent / "shared/samples"),
         root / "tests/fixtures/model")
