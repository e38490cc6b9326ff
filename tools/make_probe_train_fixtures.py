#!/usr/bin/env python3
"""Training-loop fixtures: the downstream classifier's head trained in PyTorch on fixed
features, for tests/suite/probe_train.rs (tests/fixtures/probe/train_<case>.safetensors + .json).

    /opt/venv/peer/bin/pip install scikit-learn
    /opt/venv/peer/bin/python tools/make_probe_train_fixtures.py

The loop is the reference's downstream training as marlin-rs documents it: Linear head, Adam
(betas 0.5/0.9, eps 1e-8), BCE-with-logits (binary) or cross-entropy (multiclass), one
`ReduceLROnPlateau(mode="min", factor=0.5, patience=7, min_lr=1e-8)` step per epoch on the
epoch's training loss, stop once the rate falls below `stop_lr`, the best epoch by validation
AUC (ties by the lower validation loss). So that a few dozen epochs exercise the plateau and
the stop, the rate starts at 0.5 (binary) or 0.1 (multiclass) and the stop is at a tenth of
that (the reference's 1e-4 and 1e-6 take hundreds of epochs; the mechanism is the same). The
settings were chosen where the run is not chaotic: perturbing the initial weights by 1e-6
changes neither the epochs nor the rates, so float rounding cannot flip a plateau decision. One batch holds the whole training split, so
the order of samples does not matter and no shuffle needs replaying.

Data: 16-dimensional Gaussian features, labels from a random linear rule with 20% of them
flipped (not separable, so the loss plateaus): 64/24/24 samples (binary), 512/192/192 (4-class). Saved: the features of each split, targets, the
head's initial weights (fc.weight [k, d], fc.bias [k]), the best head, and per epoch the rate,
training loss, validation loss and validation AUC.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

D, MAX_EPOCHS = 16, 300
SIZES = {"train": 64, "val": 24, "test": 24}


def data(kind, k, rng, scale=1):
    w = rng.normal(size=(D, k))
    out = {}
    for split, n in SIZES.items():
        n *= scale
        x = rng.normal(size=(n, D)).astype(np.float32)
        logits = x @ w
        if kind == "binary":
            y = (logits[:, 0] > 0).astype(np.int64)
            flip = rng.random(n) < 0.2
            y[flip] = 1 - y[flip]
        else:
            y = logits.argmax(1)
            flip = rng.random(n) < 0.2
            y[flip] = rng.integers(0, k, flip.sum())
        out[split] = (x, y)
    return out


def loss_fn(kind, logits, y):
    if kind == "binary":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def auc(kind, logits, y):
    if kind == "binary":
        return roc_auc_score(y.numpy(), torch.sigmoid(logits[:, 0]).numpy())
    return roc_auc_score(y.numpy(), torch.softmax(logits, 1).numpy(), multi_class="ovr",
                         average="macro")


def run(kind, k, seed, lr, stop_lr, scale, out: Path):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    splits = data(kind, k, rng, scale)
    fc = torch.nn.Linear(D, k)
    init = {"fc.weight": fc.weight.detach().clone(), "fc.bias": fc.bias.detach().clone()}
    opt = torch.optim.Adam(fc.parameters(), lr=lr, betas=(0.5, 0.9), eps=1e-8)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=7,
                                                       min_lr=1e-8)
    xt, yt = (torch.from_numpy(a) for a in splits["train"])
    xv, yv = (torch.from_numpy(a) for a in splits["val"])
    log = {"lr": [], "train_loss": [], "val_loss": [], "val_auc": []}
    best = None
    for epoch in range(1, MAX_EPOCHS + 1):
        epoch_lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        loss = loss_fn(kind, fc(xt), yt)
        loss.backward()
        opt.step()
        with torch.no_grad():
            lv = fc(xv)
            val_loss = float(loss_fn(kind, lv, yv))
            val_auc = float(auc(kind, lv, yv))
        for key, v in [("lr", epoch_lr), ("train_loss", loss.item()), ("val_loss", val_loss),
                       ("val_auc", val_auc)]:
            log[key].append(v)
        score = (val_auc, -val_loss)
        if best is None or score > best[0]:
            best = (score, epoch, {n: p.detach().clone() for n, p in
                                   [("fc.weight", fc.weight), ("fc.bias", fc.bias)]})
        sched.step(loss.item())
        if opt.param_groups[0]["lr"] < stop_lr:
            break
    arrays = {f"init.{n}": t for n, t in init.items()}
    arrays.update({f"best.{n}": t for n, t in best[2].items()})
    for split, (x, y) in splits.items():
        arrays[f"{split}.x"] = torch.from_numpy(x)
        arrays[f"{split}.y"] = torch.from_numpy(y.astype(np.float32))
    save_file({n: t.contiguous().float() for n, t in arrays.items()},
              str(out / f"train_{kind}.safetensors"))
    meta = {"kind": kind, "k": k, "d": D, "start_lr": lr, "stop_lr": stop_lr, "epochs": len(log["lr"]),
            "best_epoch": best[1], "torch": torch.__version__, **log}
    (out / f"train_{kind}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(kind, "epochs", len(log["lr"]), "best", best[1], "lrs", sorted(set(log["lr"]), reverse=True))


def main():
    out = Path(__file__).resolve().parent.parent / "tests/fixtures/probe"
    out.mkdir(parents=True, exist_ok=True)
    run("binary", 1, 11, 0.5, 0.05, 1, out)
    run("multiclass", 4, 12, 0.1, 0.011, 8, out)


if __name__ == "__main__":
    main()
