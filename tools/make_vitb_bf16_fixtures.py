#!/usr/bin/env python3
"""The peer's own bf16 numbers at the released width: the formula ViT-B-wide model and input
clips of make_vitb_fixtures.py (imported from there), run by marlin-pytorch under
torch.autocast("cpu", torch.bfloat16), its fastest CPU mode. Needs marlin-pytorch and torch
(see make_model_fixtures.py for the venv):
    /opt/venv/peer/bin/python tools/make_vitb_bf16_fixtures.py
Writes tests/fixtures/model/vitb2.bf16.safetensors:
  features   [2, 768]       extract_features(clips, keep_seq=False) under bf16 autocast
  seq_rows   [2, 32, 768]   extract_features(clips, keep_seq=True) at tokens 0, 49, ..., 1519
"""
import sys
from pathlib import Path

import numpy as np
import torch
from marlin_pytorch import Marlin
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_vitb_fixtures import CFG, SEQ_ROWS, draws, param  # noqa: E402


def main(out: Path):
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
    arrays = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        arrays["features"] = model.extract_features(clips, keep_seq=False).float()
        arrays["seq_rows"] = model.extract_features(clips, keep_seq=True)[:, SEQ_ROWS, :].float()
    for k, v in arrays.items():
        print(k, tuple(v.shape), float(v.abs().max()))
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "vitb2.bf16.safetensors"))


if __name__ == "__main__":
    main(Path(__file__).resolve().parent.parent / "tests/fixtures/model")
