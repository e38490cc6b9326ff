#!/usr/bin/env python3
"""marlin-pytorch side of the CPU feature benchmark: seconds per clip of extract_features
(random weights, same shapes as the released model). Run by bench/cpu.sh."""
import argparse
import time

import torch
from marlin_pytorch import Marlin
from marlin_pytorch.config import resolve_config

p = argparse.ArgumentParser()
p.add_argument("--model", default="marlin_vit_base_ytf")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--iters", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(a.threads)
c = resolve_config(a.model)
m = Marlin(img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames,
           encoder_embed_dim=c.encoder_embed_dim, encoder_depth=c.encoder_depth,
           encoder_num_heads=c.encoder_num_heads, decoder_embed_dim=c.decoder_embed_dim,
           decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads,
           mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale, drop_rate=0.0,
           attn_drop_rate=0.0, norm_layer=c.norm_layer, init_values=c.init_values,
           tubelet_size=c.tubelet_size, as_feature_extractor=True).eval()
x = torch.rand(a.batch_size, 3, 16, 224, 224)
with torch.no_grad():
    m.extract_features(x, keep_seq=False)
    t0 = time.perf_counter()
    for _ in range(a.iters):
        m.extract_features(x, keep_seq=False)
    s = (time.perf_counter() - t0) / (a.iters * a.batch_size)
print(f"peer seconds per clip: {s:.3f}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
