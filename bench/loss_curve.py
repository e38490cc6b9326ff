#!/usr/bin/env python3
"""Compares the loss curves of two `marlin pretrain` runs (their metrics.csv): a bf16 run
against the fp32 run of the same data, seed and schedule. Prints both curves epoch by epoch
(train and validation reconstruction loss), the relative differences, `parity NAME VALUE`
lines for bench/gpu_results.py, and writes the picture as SVG (no plotting library needed).

Passes (exit 0) when the bf16 run follows the fp32 run: each epoch's train reconstruction loss
within TOL (default 5%) of the fp32 run's, and the mean difference within TOL/2.

    bench/loss_curve.py FP32_METRICS BF16_METRICS [--svg OUT.svg] [--tol 0.05]
"""
import argparse
import csv
import sys


def read(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{path}: no epochs")
    return [(int(r["epoch"]), float(r["train_rec"]), float(r["val_rec"])) for r in rows]


def svg(curves, title):
    """Train (solid) and validation (dashed) reconstruction loss per epoch, one colour per run."""
    w, h, m = 640, 400, 56
    pts = [(e, v) for _, rows in curves for (e, t, vv) in rows for v in (t, vv)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = max(x1, x0 + 1), y1 if y1 > y0 else y0 + 1e-6
    sx = lambda e: m + (e - x0) / (x1 - x0) * (w - 2 * m)
    sy = lambda v: h - m - (v - y0) / (y1 - y0) * (h - 2 * m)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle">{title}</text>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 16}" text-anchor="middle">epoch</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" '
           f'text-anchor="middle">reconstruction loss (MSE)</text>']
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{m - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for i in range(5):
        e = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{sx(e):.1f}" y="{h - m + 16}" text-anchor="middle">{e:.0f}</text>')
    colours = ["#1f77b4", "#d62728"]
    for k, (name, rows) in enumerate(curves):
        c = colours[k % 2]
        for col, dash in ((1, ""), (2, ' stroke-dasharray="5,4"')):
            line = " ".join(f"{sx(r[0]):.1f},{sy(r[col]):.1f}" for r in rows)
            out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        y = m + 16 * k
        out.append(f'<line x1="{w - m - 150}" y1="{y}" x2="{w - m - 120}" y2="{y}" '
                   f'stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{w - m - 114}" y="{y + 4}">{name} (dashed: validation)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32")
    ap.add_argument("bf16")
    ap.add_argument("--svg", default=None)
    ap.add_argument("--tol", type=float, default=0.05)
    a = ap.parse_args()
    f, b = read(a.fp32), read(a.bf16)
    n = min(len(f), len(b))
    if n == 0 or len(f) != len(b):
        print(f"the runs have {len(f)} and {len(b)} epochs")
    print(f"{'epoch':>5} {'fp32 train':>11} {'bf16 train':>11} {'rel':>8} {'fp32 val':>10} {'bf16 val':>10}")
    rel = []
    for (e, ft, fv), (_, bt, bv) in zip(f[:n], b[:n]):
        r = abs(bt - ft) / max(abs(ft), 1e-12)
        rel.append(r)
        print(f"{e:>5} {ft:>11.5f} {bt:>11.5f} {r:>8.2%} {fv:>10.5f} {bv:>10.5f}")
    worst, mean = max(rel), sum(rel) / len(rel)
    drop = (f[0][1] - f[n - 1][1]) / max(abs(f[0][1]), 1e-12)
    print(f"train reconstruction loss: fp32 fell {drop:.1%} over {n} epochs; bf16 vs fp32: "
          f"worst {worst:.2%}, mean {mean:.2%} (tolerance {a.tol:.0%} each, {a.tol / 2:.1%} mean)")
    print(f"parity curve_bf16_train_rec_worst {worst:.3e}")
    print(f"parity curve_bf16_train_rec_mean {mean:.3e}")
    if a.svg:
        with open(a.svg, "w") as fh:
            fh.write(svg([("fp32", f[:n]), ("bf16", b[:n])],
                         f"ViT-B pretraining on the shared samples: {n} epochs, bf16 vs fp32"))
        print(f"wrote {a.svg}")
    ok = worst <= a.tol and mean <= a.tol / 2
    print("curve: " + ("bf16 follows fp32" if ok else "FAIL: bf16 leaves the fp32 curve"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
