#!/usr/bin/env python3
"""The reference's pretraining step in PyTorch (marlin-pytorch's ViT-B encoder/decoder, the
critic MLP, two AdamW), timed like `marlin bench --train`: random clips, random 90% masks,
one critic update then one generator update per step; seconds per step after a warm-up.
The critic update is the reference's `d_step` as written (ControlNet/MARLIN model/marlin.py):
its loss back-propagates through the generator's reconstruction too (no detach), and the
generator's gradients from it are then zeroed before the generator update.
Run by bench/pretrain.sh and bench/gpu.sh: --device cuda (synchronised), --precision tf32 (TF32
matrix products) or bf16 (torch.autocast(bfloat16) around the forward passes; fp32 weights and
AdamW, as mixed-precision training does). --ddp under torchrun: both modules in torch's
DistributedDataParallel over Gloo (NCCL on CUDA), the reference's Lightning strategy=ddp, each
rank at --batch (bench/ddp_cpu.sh)."""
import argparse
import time
import importlib
import sys
import types

# The GPU machine has torch but neither OpenCV nor ffmpeg-python, which marlin_pytorch imports
# at module level for its video helpers; the timed code never calls them.
for _name in ("cv2", "ffmpeg"):
    try:
        importlib.import_module(_name)
    except ImportError:
        sys.modules[_name] = types.ModuleType(_name)

import torch
from einops import rearrange
from marlin_pytorch import Marlin

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--iters", type=int, default=2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu")
ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
ap.add_argument("--ddp", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
torch.backends.cudnn.allow_tf32 = a.precision == "tf32"


def autocast():
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


m = Marlin(img_size=224, patch_size=16, n_frames=16, encoder_embed_dim=768, encoder_depth=12,
           encoder_num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
           mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
           norm_layer="LayerNorm", init_values=0.0, tubelet_size=2, as_feature_extractor=False).train().to(dev)
disc = torch.nn.Sequential(torch.nn.Linear(1536, 1536), torch.nn.LeakyReLU(0.01),
                           torch.nn.Linear(1536, 1)).to(dev)
if a.ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    m, disc = DDP(m), DDP(disc)
kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
opt_g = torch.optim.AdamW(m.parameters(), **kw)
opt_d = torch.optim.AdamW(disc.parameters(), **kw)
b, n = a.batch, 1568
clip = torch.rand(b, 3, 16, 224, 224, device=dev)
mask = torch.zeros(b, n, dtype=torch.bool)
for i in range(b):
    mask[i, torch.randperm(n)[:156]] = True
mask = mask.to(dev)
real = rearrange(clip, "b c (t p0) (h p1) (w p2) -> b (t h w) (c p0 p1 p2)", p0=2, p1=16, p2=16)
real = real[~mask].view(b, -1, 1536)


def step():
    opt_d.zero_grad()
    with autocast():
        pred = m(clip, mask)
        loss_d = disc(pred).mean() - disc(real).mean()
    loss_d.backward()
    opt_d.step()
    opt_g.zero_grad()
    with autocast():
        pred = m(clip, mask)
        loss = torch.nn.functional.mse_loss(pred.float(), real) + 0.01 * -disc(pred).float().mean()
    loss.backward()
    opt_g.step()


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
