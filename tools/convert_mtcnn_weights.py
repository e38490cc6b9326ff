#!/usr/bin/env python3
"""Convert MTCNN (P/R/O-Net) weights from the facenet-pytorch wheel (MIT, PyPI) to
assets/mtcnn.safetensors, and make numerical fixtures with facenet-pytorch's own networks.

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/fnp
    /opt/venv/peer/bin/pip install --no-deps /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl
    /opt/venv/peer/bin/python tools/convert_mtcnn_weights.py

Keys: `{pnet,rnet,onet}.<layer>.{weight,bias}` as in facenet-pytorch's modules, float32.
Fixtures (tests/fixtures/face/nets.safetensors): seeded random inputs for each network
(P-Net at two image sizes, R-Net 24x24 and O-Net 48x48 crops) and the networks' outputs.
"""
import json
from pathlib import Path

import facenet_pytorch
import torch
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
nets = {"pnet": PNet().eval(), "rnet": RNet().eval(), "onet": ONet().eval()}
weights = {f"{n}.{k}": v.detach().float().contiguous() for n, m in nets.items() for k, v in m.state_dict().items()}
save_file(weights, str(root / "assets/mtcnn.safetensors"),
          metadata={"source": f"facenet-pytorch {facenet_pytorch.__version__ if hasattr(facenet_pytorch, '__version__') else '2.6.0'} data/{{pnet,rnet,onet}}.pt",
                    "license": "MIT (c) 2019 Timothy Esler"})

torch.manual_seed(0)
io = {}
inputs = {
    "pnet_a": ("pnet", torch.rand(1, 3, 37, 53) * 2 - 1),
    "pnet_b": ("pnet", torch.rand(2, 3, 12, 12) * 2 - 1),
    "rnet": ("rnet", torch.rand(3, 3, 24, 24) * 2 - 1),
    "onet": ("onet", torch.rand(2, 3, 48, 48) * 2 - 1),
}
with torch.no_grad():
    for name, (net, x) in inputs.items():
        out = nets[net](x)
        io[f"{name}.input"] = x
        for i, o in enumerate(out):
            io[f"{name}.out{i}"] = o.contiguous()
save_file(io, str(root / "tests/fixtures/face/nets.safetensors"))
print({k: tuple(v.shape) for k, v in io.items()})
print(json.dumps({k: list(v.shape) for k, v in weights.items()})[:300])
