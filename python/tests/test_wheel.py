"""The installed wheel as a new user meets it: no Rust toolchain, no FFmpeg and no CUDA on
PATH. H.264 in MP4 is decoded in-process, so the bundled sample and the H.264 fixtures extract
anyway, with FFmpeg's features where FFmpeg is there to compare with; another codec says in one
line that it needs FFmpeg. Each check runs in a child process whose PATH is an empty folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import marlin_rs

ROOT = Path(__file__).resolve().parents[2]
VIDEO = ROOT / "tests" / "fixtures" / "video"
SAMPLE = ROOT / "assets" / "sample_face.mp4"


def run_bare(script, tmp_path, **env):
    """`script` in a child Python with nothing on PATH (no ffmpeg, cargo, nvcc)."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if k not in ("PATH", "MARLIN_DECODER")}
    e.update(PATH=str(empty), **env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=e)


def test_the_package_says_what_it_found():
    info = marlin_rs.info()
    assert info["h264_in_process"] is True
    assert info["version"] == marlin_rs.__version__
    for key in ("devices_built", "cpu", "ffmpeg", "cuda_driver", "gpus", "cuda_libraries", "vulkan"):
        assert key in info, key


def test_the_bundled_sample_extracts_without_ffmpeg_or_cargo(tmp_path):
    """The README's first job from Python on a bare machine: ViT-B (random weights) on the
    bundled H.264 sample, one 16-frame clip -> [1, 768]."""
    script = f"""
import numpy as np, marlin_rs
info = marlin_rs.info()
assert info["ffmpeg"]["at"] is None, info["ffmpeg"]
m = marlin_rs.Marlin.from_config("marlin_vit_base_ytf")
f = m.extract_video({str(SAMPLE)!r})
assert f.shape == (1, 768) and np.isfinite(f).all(), f.shape
print("ok", f.shape)
"""
    r = run_bare(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok"), r.stdout


def test_h264_without_ffmpeg_equals_ffmpegs_pipe(tmp_path):
    """Features of the H.264 fixtures, decoded in-process with nothing on PATH, against the
    same extraction through FFmpeg (where this machine has it): within 1e-4, same windows."""
    out = tmp_path / "in.npz"
    script = f"""
import numpy as np, marlin_rs
marlin_rs.register_model_from_yaml("tiny224", {str(VIDEO / 'tiny224.yaml')!r})
m = marlin_rs.Marlin.from_file("tiny224", {str(VIDEO / 'tiny224.pt')!r})
np.savez({str(out)!r}, **{{v: m.extract_video({str(VIDEO)!r} + "/" + v + ".mp4", keep_seq=True) for v in ["h264_10", "h264_33", "h264_143"]}})
"""
    r = run_bare(script, tmp_path)
    assert r.returncode == 0, r.stderr
    ours = np.load(out)
    assert {k: ours[k].shape[0] for k in ours} == {"h264_10": 1, "h264_33": 1, "h264_143": 4}
    if shutil.which("ffmpeg") is None:
        pytest.skip("no FFmpeg here to compare with (the in-process run above passed)")
    os.environ["MARLIN_DECODER"] = "ffmpeg"
    try:
        marlin_rs.register_model_from_yaml("tiny224", str(VIDEO / "tiny224.yaml"))
        m = marlin_rs.Marlin.from_file("tiny224", str(VIDEO / "tiny224.pt"))
        for k in ours:
            ff = m.extract_video(str(VIDEO / f"{k}.mp4"), keep_seq=True)
            assert ff.shape == ours[k].shape, k
            assert float(np.abs(ff - ours[k]).max()) <= 1e-4, k
    finally:
        del os.environ["MARLIN_DECODER"]


def test_another_codec_without_ffmpeg_is_one_clear_error(tmp_path):
    script = f"""
import marlin_rs
marlin_rs.register_model_from_yaml("tiny224", {str(VIDEO / 'tiny224.yaml')!r})
m = marlin_rs.Marlin.from_file("tiny224", {str(VIDEO / 'tiny224.pt')!r})
try:
    m.extract_video({str(VIDEO / 'mpeg4_20.mp4')!r})
except RuntimeError as e:
    print(e)
"""
    r = run_bare(script, tmp_path)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "mpeg4_20.mp4: its video is mp4v, not H.264: reading it needs FFmpeg" in line, line
    assert "apt-get install ffmpeg" in line and "\n" not in line, line
