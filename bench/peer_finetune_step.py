#!/usr/bin/env python3
"""The reference's fine-tuning step in PyTorch (its downstream `Classifier` with the encoder:
marlin-pytorch's ViT-B `extract_features(x, keep_seq=False)`, mean-pooled and normed, under a
Linear head; BCE with logits over 40 labels as CelebV-HQ appearance; Adam lr 1e-4 betas
(0.5, 0.9)), timed like `marlin bench --finetune`: random clips, seconds per step after a
warm-up. Run by bench/finetune.sh and bench/gpu.sh: --device cuda (synchronised), --precision
tf32 or bf16 (torch.autocast(bfloat16) around the forward; fp32 weights and Adam)."""
import argparse
import importlib
import sys
import time
import types

# The GPU machine has torch but neither OpenCV nor ffmpeg-python, which marlin_pytorch imports
# at module level for its video helpers; the timed code never calls them.
for _name in ("cv2", "ffmpeg"):
    try:
        importlib.import_module(_name)
    except ImportError:
        sys.modules[_name] = types.ModuleType(_name)

import torch
from marlin_pytorch import Marlin

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--iters", type=int, default=2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
torch.backends.cudnn.allow_tf32 = a.precision == "tf32"

m = Marlin(img_size=224, patch_size=16, n_frames=16, encoder_embed_dim=768, encoder_depth=12,
           encoder_num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
           mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
           norm_layer="LayerNorm", init_values=0.0, tubelet_size=2,
           as_feature_extractor=True).train().to(dev)
fc = torch.nn.Linear(768, 40).to(dev)
params = list(m.parameters()) + list(fc.parameters())
opt = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9), eps=1e-8)
b = a.batch
clip = torch.rand(b, 3, 16, 224, 224, device=dev)
y = (torch.arange(b * 40, device=dev) % 3 == 0).float().view(b, 40)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step():
    opt.zero_grad()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
        logits = fc(m.extract_features(clip, keep_seq=False))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    opt.step()


step()
sync()
t = time.perf_counter()
for _ in range(a.iters):
    step()
sync()
s = (time.perf_counter() - t) / a.iters
print(f"peer seconds per step: {s:.3f} (samples/s {b / s:.2f}; {a.device}, {a.precision}, batch {b})")
if dev.type == "cuda":
    print(f"peer peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
