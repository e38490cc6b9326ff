#!/usr/bin/env python3
"""marlin_rs side of bench/python.sh: Marlin.from_file + extract_video, timed as
bench/peer_extract.py times the peer (weights load, decode, every clip)."""
import argparse
import time

p = argparse.ArgumentParser()
p.add_argument("--weights", required=True)
p.add_argument("--video", required=True)
a = p.parse_args()
from marlin_rs import Marlin  # noqa: E402  (threads: RAYON_NUM_THREADS)

t0 = time.perf_counter()
m = Marlin.from_file("marlin_vit_base_ytf", a.weights)
t1 = time.perf_counter()
f = m.extract_video(a.video)
t2 = time.perf_counter()
print("ours features", tuple(f.shape))
print(f"ours seconds: {t2 - t0:.2f} (load {t1 - t0:.2f}, extract_video {t2 - t1:.2f})")
