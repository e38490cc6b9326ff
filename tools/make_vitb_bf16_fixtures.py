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

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_vitb_fixtures import SEQ_ROWS, formula_model_and_clips  # noqa: E402


def main(out: Path):
    model, clips = formula_model_and_clips()
    arrays = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        arrays["features"] = model.extract_features(clips, keep_seq=False).float()
        arrays["seq_rows"] = model.extract_features(clips, keep_seq=True)[:, SEQ_ROWS, :].float()
    for k, v in arrays.items():
        print(k, tuple(v.shape), float(v.abs().max()))
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "vitb2.bf16.safetensors"))


if __name__ == "__main__":
    main(Path(__file__).resolve().parent.parent / "tests/fixtures/model")
