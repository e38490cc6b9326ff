"""MARLIN facial video features in Rust, called as marlin-pytorch is.

    from marlin_rs import Marlin            # was: from marlin_pytorch import Marlin
    model = Marlin.from_online("marlin_vit_base_ytf")
    features = model.extract_video("face.mp4")          # numpy float32 [windows, 768]

No torch needed; torch tensors are accepted as inputs where the peer takes them. Errors are
FileNotFoundError (a missing input), ValueError (bad config, shape or argument) or
RuntimeError, with the same one-line messages as the `marlin` command.
"""

import glob as _glob
import os as _os

# NVIDIA's libraries from this environment's pip wheels (PyTorch's, or nvidia-cudnn-cu12 and
# friends): the CUDA engine opens cuBLASLt, cuDNN and NVRTC at run time and looks in
# MARLIN_CUDA_LIBS first (see `docs/gpu.md`). No import of torch or of those packages' code.
try:
    import nvidia as _nvidia

    _dirs = [d for p in _nvidia.__path__ for d in sorted(_glob.glob(_os.path.join(p, "*", "lib")))]
    if _dirs:
        _os.environ["MARLIN_CUDA_LIBS"] = _os.pathsep.join(
            [d for d in _os.environ.get("MARLIN_CUDA_LIBS", "").split(_os.pathsep) if d] + _dirs
        )
except ImportError:
    pass

from ._marlin_rs import (
    Classifier,
    Marlin,
    __version__,
    crop_video,
    info,
    model_names,
    parse_face,
    set_precision,
)
from .config import register_model_from_yaml

__all__ = [
    "Marlin",
    "Classifier",
    "register_model_from_yaml",
    "model_names",
    "crop_video",
    "info",
    "parse_face",
    "set_precision",
    "__version__",
]
