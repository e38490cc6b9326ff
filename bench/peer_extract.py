#!/usr/bin/env python3
"""marlin-pytorch side of the end-to-end benchmark (bench/cpu.sh): Marlin.from_file + extract_video.
With --save-weights, writes random ViT-B encoder weights as a .pt for both sides and exits (also
for bench/gpu.sh)."""
import argparse
import importlib
import sys
import time
import types

import torch

p = argparse.ArgumentParser()
p.add_argument("--weights")
p.add_argument("--video")
p.add_argument("--save-weights")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--bf16", action="store_true", help="extract_video under torch.autocast(cpu, bfloat16)")
a = p.parse_args()
torch.set_num_threads(a.threads)
if a.save_weights:
    # Writing weights needs neither OpenCV nor ffmpeg-python, which marlin_pytorch imports at
    # module level (a GPU machine with torch alone may lack them).
    for _name in ("cv2", "ffmpeg"):
        try:
            importlib.import_module(_name)
        except ImportError:
            sys.modules[_name] = types.ModuleType(_name)
from marlin_pytorch import Marlin  # noqa: E402

if a.save_weights:
    from marlin_pytorch.config import resolve_config
    c = resolve_config("marlin_vit_base_ytf")
    m = Marlin(img_size=224, patch_size=16, n_frames=16, encoder_embed_dim=c.encoder_embed_dim,
               encoder_depth=c.encoder_depth, encoder_num_heads=c.encoder_num_heads,
               decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
               decoder_num_heads=c.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
               drop_rate=0.0, attn_drop_rate=0.0, norm_layer="LayerNorm", init_values=0.0,
               tubelet_size=2, as_feature_extractor=True)
    torch.save(m.state_dict(), a.save_weights)
    raise SystemExit(0)

t0 = time.perf_counter()
m = Marlin.from_file("marlin_vit_base_ytf", a.weights)
if a.bf16:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = m.extract_video(a.video)
else:
    f = m.extract_video(a.video)
print("peer features", tuple(f.shape))
print(f"peer seconds: {time.perf_counter() - t0:.2f}")
