"""The Ray Data stage of docs/scale.md on a local Ray instance on the CPU (2 actors): the same
.npy files as `marlin extract`, and rows that say which input failed. Skipped, loudly, where Ray
is not installed (CI installs it)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import marlin_rs

ROOT = Path(__file__).resolve().parents[2]
VIDEO = ROOT / "tests" / "fixtures" / "video"

try:
    import ray
except ImportError:  # pragma: no cover
    ray = None


class Extract:
    """The stage of docs/scale.md, on the fixture model (one per actor)."""

    def __init__(self, out_dir):
        marlin_rs.register_model_from_yaml("tiny224", str(VIDEO / "tiny224.yaml"))
        self.model = marlin_rs.Marlin.from_file("tiny224", str(VIDEO / "tiny224.pt"))
        self.out_dir = out_dir

    def __call__(self, batch):
        paths = [str(p) for p in batch["path"]]
        r = self.model.extract_many(paths, self.out_dir, progress=False, failures_file=None)
        failed = dict(r["failures"])
        return {
            "path": paths,
            "status": ["failed" if p in failed else "done" for p in paths],
            "error": [failed.get(p, "") for p in paths],
        }


def test_ray_map_batches_writes_what_the_cli_writes(tmp_path):
    if ray is None:
        if os.environ.get("CI"):
            pytest.fail("Ray is not installed: .ci/run installs it (pip install 'ray[data]')")
        pytest.skip("*** SKIPPED: Ray is not installed (pip install 'ray[data]') ***")
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["h264_10.mp4", "h264_33.mp4", "h264_100.mp4", "h264_143.mp4", "mpeg4_20.mp4", "mpeg4_100.mp4"]
    for n in names:
        shutil.copy(VIDEO / n, inputs / n)
    (inputs / "broken.mp4").write_bytes(b"not a video")
    paths = sorted(str(p) for p in inputs.iterdir())

    # The workers import this module (the stage class lives here) from the tests folder.
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False, runtime_env=env)
    try:
        ds = ray.data.from_items([{"path": p} for p in paths])
        rows = ds.map_batches(
            Extract,
            fn_constructor_kwargs={"out_dir": str(tmp_path / "ray")},
            batch_size=2,
            concurrency=2,
            num_gpus=0,
            num_cpus=1,
        ).take_all()
    finally:
        ray.shutdown()
    status = {Path(r["path"]).name: (r["status"], r["error"]) for r in rows}
    assert len(rows) == 7 and len(status) == 7
    assert status["broken.mp4"][0] == "failed" and "broken.mp4" in status["broken.mp4"][1]
    assert all(s == "done" for n, (s, _) in status.items() if n != "broken.mp4")

    # The same files as one process writes (and as `marlin extract`, which runs the same
    # library call), and for the fixture videos the peer's numbers.
    one = tmp_path / "one"
    Extract(str(one))({"path": paths})
    for n in names:
        stem = n.rsplit(".", 1)[0]
        a, b = np.load(tmp_path / "ray" / f"{stem}.npy"), np.load(one / f"{stem}.npy")
        assert a.shape == b.shape and np.array_equal(a, b), n
    from test_marlin_rs import read_safetensors, max_abs_diff

    expected = read_safetensors(VIDEO / "expected.safetensors")
    assert max_abs_diff(np.load(tmp_path / "ray" / "h264_143.npy"), expected["h264_143.mp4|sr2_s16"]) <= 1e-4
