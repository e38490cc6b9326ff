from os import PathLike
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, "PathLike[str]"]
_Array = Any  # numpy array or torch tensor

__version__: str

class Marlin:
    """A MARLIN model, called as marlin-pytorch's `Marlin` (returns numpy float32 arrays)."""

    @classmethod
    def from_online(
        cls, model_name: str, full_model: bool = False, device: str = "cpu", precision: Optional[str] = None
    ) -> "Marlin":
        """Download (once, into the cache) and load a released model (`marlin_vit_{small,base,large}_ytf`).
        `full_model` adds the decoder for reconstruction; `device` is "cpu" or "cuda[:N]";
        `precision` ("fp32", "tf32", "bf16") is this model's own (default: the process's
        `set_precision`, else fp32 on the CPU and tf32 on a GPU)."""
    @classmethod
    def from_file(cls, model_name: str, path: _Path, device: str = "cpu", precision: Optional[str] = None) -> "Marlin":
        """Load `.pt`, Lightning `.ckpt` or safetensors weights with the config `model_name`
        (released, or registered with `register_model_from_yaml`)."""
    @classmethod
    def from_config(
        cls, model_name: str, seed: int = 0, full_model: bool = False, device: str = "cpu", precision: Optional[str] = None
    ) -> "Marlin":
        """A fresh model with the reference's initialisation (deterministic in `seed`)."""
    def save(self, path: _Path) -> None:
        """Write the weights as safetensors with the official key names."""
    @staticmethod
    def clean_cache(verbose: bool = True) -> None:
        """Remove the downloaded checkpoints."""
    @property
    def name(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def precision(self) -> str:
        """This model's precision ("fp32", "tf32" or "bf16"), fixed when it was loaded."""
    @property
    def embed_dim(self) -> int: ...
    @property
    def full_model(self) -> bool: ...
    def extract_video(
        self,
        video_path: _Path,
        crop_face: bool = False,
        sample_rate: int = 2,
        stride: int = 16,
        reduction: str = "none",
        keep_seq: bool = False,
        detector_device: Optional[str] = None,
        batch_size: int = 4,
    ) -> npt.NDArray[np.float32]:
        """Features of a video file or frame folder: [windows, D] ([windows, N, D] with keep_seq),
        or [D] with reduction "mean"/"max". `crop_face` detects and tracks the face first."""
    def extract_features(self, x: _Array, keep_seq: bool = True) -> npt.NDArray[np.float32]:
        """Features of clips [B, 3, 16, 224, 224] (RGB in [0, 1]): [B, N, D], or [B, D]."""
    def __call__(self, x: _Array, mask: _Array) -> npt.NDArray[np.float32]:
        """Reconstruction of the masked tubelets [B, N_masked, 1536]; mask [B, N], True = visible."""
    def reconstruct(
        self,
        video_path: _Path,
        out: _Path,
        mask_strategy: str = "fasking",
        mask_ratio: float = 0.9,
        start: int = 0,
        sample_rate: int = 2,
        seed: int = 0,
        crop_face: bool = False,
    ) -> npt.NDArray[np.uint8]:
        """Original | masked | reconstruction of one clip (full model), written to `out` (.png
        grid or .mp4) and returned as the grid [H * frames, 3 * W, 3]."""
    def extract_many(
        self,
        inputs: Sequence[_Path],
        out_dir: _Path,
        crop_face: bool = False,
        sample_rate: int = 2,
        stride: int = 16,
        reduction: str = "none",
        keep_seq: bool = False,
        batch_size: int = 4,
        overwrite: bool = False,
        progress: bool = True,
        failures_file: Optional[str] = "failures.json",
    ) -> Dict[str, Any]:
        """Many inputs (files, frame folders, folders to walk) to `.npy` files in `out_dir`,
        batched across videos and resumable. Returns written, skipped, clips, failures
        [(file, error)], interrupted; failures also go to out_dir/<failures_file> (None: not
        written, as from many Ray actors sharing one folder)."""

class Classifier:
    """A classifier trained by `marlin probe` / `marlin finetune` (its run folder)."""

    @staticmethod
    def load(run_dir: _Path) -> "Classifier": ...
    @property
    def names(self) -> List[str]: ...
    def predict(self, path: _Path, model: Optional[Marlin] = None) -> npt.NDArray[np.float32]:
        """Probabilities of a .npy feature file or a video (a probe's videos need `model`)."""
    def label(self, probs: Sequence[float]) -> str: ...

def register_model_from_yaml(name: str, path: _Path) -> None:
    """Register a training YAML config under `name` for `Marlin.from_file`."""

def model_names() -> List[str]:
    """Released and registered config names."""

def crop_video(video_path: _Path, out: _Path, size: int = 224) -> int:
    """Crop the face of a video in the wild into `out` (.mp4, or a folder of PNG frames when
    `out` has no extension). Returns the frame count."""

def parse_face(
    path: _Path, frame: int = 0, parser: str = "mesh", size: int = 224
) -> Dict[str, Any]:
    """The LaPa label map of the largest face in an image (or frame `frame` of a video), as
    `marlin parse` makes it: {"labels": uint8 [size, size] (0 background, 1 skin, 2/3 brows,
    4/5 eyes, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair), "crop": uint8
    [size, size, 3], "box": [x1, y1, x2, y2]}. `parser`: "mesh" or "template"."""

def info() -> Dict[str, Any]:
    """What this machine offers marlin (as `marlin doctor --json`): "devices_built", "cpu",
    "h264_in_process", "ffmpeg", "cuda_driver", "gpus", "cuda_libraries" (cuBLASLt, cuDNN, NVRTC:
    where found, version, or what to install), "vulkan", "kernel_cache"."""

def set_precision(precision: str) -> str:
    """The precision of models loaded after this call without a `precision=` of their own
    (a loaded model keeps its own): CPU matrix products in "f32" (default) or "bf16" (f32
    sums; AMX or AVX-512 BF16); "tf32" on a GPU. Returns the precision in effect: "bf16" on AMX and where AVX-512 BF16 dot products
    outrun f32 FMAs (AMD Zen 4); "f32" with a warning without AVX-512 BF16, or on a Xeon without
    AMX, where bf16 is slower than f32 (MARLIN_BF16_WITHOUT_AMX=1 forces bf16)."""
