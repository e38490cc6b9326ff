#!/usr/bin/env python3
"""marlin-pytorch side of the feature benchmark: seconds per clip of extract_features (random
weights, same shapes as the released model). Run by bench/cpu.sh and bench/gpu.sh.

--device cuda times on the GPU (synchronised); --precision tf32 allows TF32 matrix products,
bf16 runs under torch.autocast(bfloat16), as the issue's reference numbers were taken. --sdpa
replaces the peer's attention (explicit q·kᵀ, softmax, ·v) with F.scaled_dot_product_attention,
what a PyTorch expert would write (flash / memory-efficient kernels). On CUDA the peak memory
(torch.cuda.max_memory_allocated and _reserved) is printed too."""
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
from marlin_pytorch import Marlin
from marlin_pytorch.config import resolve_config

p = argparse.ArgumentParser()
p.add_argument("--model", default="marlin_vit_base_ytf")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--iters", type=int, default=3)
p.add_argument("--device", default="cpu")
p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
p.add_argument("--sdpa", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
torch.backends.cudnn.allow_tf32 = a.precision == "tf32"


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")


if a.sdpa:
    import torch.nn.functional as F
    from marlin_pytorch.model import modules

    def sdpa_forward(self, x):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))

    modules.Attention.forward = sdpa_forward

c = resolve_config(a.model)
m = Marlin(img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames,
           encoder_embed_dim=c.encoder_embed_dim, encoder_depth=c.encoder_depth,
           encoder_num_heads=c.encoder_num_heads, decoder_embed_dim=c.decoder_embed_dim,
           decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads,
           mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale, drop_rate=0.0,
           attn_drop_rate=0.0, norm_layer=c.norm_layer, init_values=c.init_values,
           tubelet_size=c.tubelet_size, as_feature_extractor=True).eval().to(dev)
x = torch.rand(a.batch_size, 3, 16, 224, 224, device=dev)
with torch.no_grad(), autocast():
    m.extract_features(x, keep_seq=False)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        m.extract_features(x, keep_seq=False)
    sync()
    s = (time.perf_counter() - t0) / (a.iters * a.batch_size)
print(f"peer seconds per clip: {s:.4f}  (clips/s {1 / s:.2f}; torch {torch.__version__}, "
      f"{a.device}, {a.precision}{' sdpa' if a.sdpa else ''}, batch {a.batch_size}, "
      f"{torch.get_num_threads()} threads)")
if dev.type == "cuda":
    print(f"peer peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
