#!/usr/bin/env python3
"""bench/gpu.sh's log -> its figures as JSON (bench/results/gpu-<date>-<gpu>.json):

  {"gpu", "date", "commit",
   "extract_vitb_b64": {"ours": {MODE: {"clips_per_s", "peak_mib", "rounds"}}, "peer": {...}},
   "first_extract_s": {"ours_cold", "ours_warm", "peer"},
   "pretrain_vitb": {"b16": {"ours": {MODE: {"samples_per_s", "peak_mib", "rounds"}}, "peer": {...}},
                     "b64": {...}},
   "finetune_vitb": {"b8": {...}, "b16": {...}} (as pretrain_vitb),
   "parity": {NAME: max_abs_diff}}

MODE is fp32, tf32, bf16 (the peer also bf16_sdpa); clips_per_s is the median over the
alternating rounds, peak_mib the largest NVML peak. gpu.sh marks what each run is with a line
`@@ <what> <who> <mode>` before it; the runs print `clips/s N` (training steps `samples/s N`),
`nvml peak: N MiB` and `(exit RC, MS ms)`; parity checks print `parity NAME VALUE`.

  python3 bench/gpu_results.py gpu.log [--out DIR]"""
import json
import os
import re
import statistics
import sys


def step_key(what):
    """("pretrain_vitb", "b16") of a training step's tag `pretrain_vitb_b16`; None otherwise."""
    for key in ("pretrain_vitb", "finetune_vitb"):
        if what.startswith(key + "_"):
            return key, what[len(key) + 1:]
    return None


def parse(lines):
    out = {"gpu": None, "date": None, "commit": None, "extract_vitb_b64": {"ours": {}, "peer": {}},
           "extract_vitl_b64": {"ours": {}, "peer": {}}, "first_extract_s": {}, "parity": {},
           "pretrain_vitb": {}, "finetune_vitb": {}}
    tag = None
    rates = {}
    for line in lines:
        line = line.rstrip("\n")
        m = re.match(r"== machine: ([^,]+), ([^,]+), ([^;]+); .*; (\S+)$", line)
        if m:
            out["gpu"], out["date"] = m.group(1).strip(), m.group(4)[:10]
        m = re.match(r"== marlin-rs (\S+);", line)
        if m:
            out["commit"] = m.group(1)
        m = re.match(r"@@ (\S+) (\S+) (\S+)", line)
        if m:
            tag = m.groups()
            continue
        m = re.match(r"parity (\S+) (\S+)", line)
        if m:
            try:
                out["parity"][m.group(1)] = float(m.group(2))
            except ValueError:
                out["parity"][m.group(1)] = None
            continue
        if tag is None:
            continue
        what, who, mode = tag
        if what.startswith("extract_"):
            m = re.search(r"clips/s ([0-9.]+)", line)
            if m and "seconds per clip" in line:
                rates.setdefault((what, who, mode), []).append(float(m.group(1)))
            m = re.search(r"nvml peak: ([0-9.]+) MiB", line)
            if m:
                d = out[what][who].setdefault(mode, {})
                d["peak_mib"] = max(d.get("peak_mib", 0.0), float(m.group(1)))
        elif step_key(what):
            key, batch = step_key(what)
            slot = out[key].setdefault(batch, {"ours": {}, "peer": {}})[who]
            m = re.search(r"samples/s ([0-9.]+)", line)
            if m and "seconds per step" in line:
                rates.setdefault((what, who, mode), []).append(float(m.group(1)))
            m = re.search(r"nvml peak: ([0-9.]+) MiB", line)
            if m:
                d = slot.setdefault(mode, {})
                d["peak_mib"] = max(d.get("peak_mib", 0.0), float(m.group(1)))
        elif what == "first":
            m = re.match(r"\(exit (\d+), (\d+) ms\)", line)
            if m:
                out["first_extract_s"][f"{who}" if mode == "-" else f"{who}_{mode}"] = (
                    int(m.group(2)) / 1e3 if m.group(1) == "0" else None)
    for (what, who, mode), v in rates.items():
        if step_key(what):
            key, batch = step_key(what)
            d = out[key][batch][who].setdefault(mode, {})
            d["samples_per_s"] = round(statistics.median(v), 2)
        else:
            d = out[what][who].setdefault(mode, {})
            d["clips_per_s"] = round(statistics.median(v), 2)
        d["rounds"] = v
    return out


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    outdir = None
    if "--out" in args:
        i = args.index("--out")
        outdir = args[i + 1]
        args = args[:i] + args[i + 2:]
    with open(args[0]) as f:
        r = parse(f)
    text = json.dumps(r, indent=1, sort_keys=True)
    if outdir:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", (r["gpu"] or "gpu")).strip("-").lower()
        path = os.path.join(outdir, f"gpu-{r['date'] or 'undated'}-{gpu}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(path)
    else:
        print(text)


if __name__ == "__main__":
    main()
