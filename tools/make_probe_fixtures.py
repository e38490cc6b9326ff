#!/usr/bin/env python3
"""Metric fixtures: scikit-learn's accuracy and ROC AUC on seeded scores with ties, for
tests/suite/probe_metrics.rs (tests/fixtures/probe/metrics.json).

    /opt/venv/peer/bin/pip install scikit-learn
    /opt/venv/peer/bin/python tools/make_probe_fixtures.py

Cases: binary (scores rounded to 0.1: many ties, some exactly 0.5), multilabel (5 labels, label
"never" has no positive: scikit-learn raises for it, we report null and leave it out of the
macro average, so the expected macro is the mean over the other labels), multiclass (4 classes,
softmax of integer logits: tied rows; one-vs-rest macro AUROC).
"""
import json
from pathlib import Path

import numpy as np
import sklearn
from sklearn.metrics import accuracy_score, roc_auc_score

rng = np.random.default_rng(7)
out = {"sklearn": sklearn.__version__}

y = rng.integers(0, 2, 50)
p = np.round(np.clip(0.35 * y + rng.random(50) * 0.6, 0, 1), 1).astype(np.float32)
out["binary"] = {"probs": p.tolist(), "targets": y.tolist(),
                 "accuracy": accuracy_score(y, p > 0.5), "auroc": roc_auc_score(y, p)}

n, k = 40, 5
y = rng.integers(0, 2, (n, k))
y[:, 3] = 0
p = np.round(np.clip(0.3 * y + rng.random((n, k)) * 0.7, 0, 1), 2).astype(np.float32)
per = [None if len(set(y[:, c])) < 2 else roc_auc_score(y[:, c], p[:, c]) for c in range(k)]
defined = [v for v in per if v is not None]
out["multilabel"] = {
    "names": ["a", "b", "c", "never", "e"], "probs": p.ravel().tolist(), "targets": y.ravel().tolist(), "k": k,
    "accuracy": accuracy_score(y.ravel(), p.ravel() > 0.5),
    "per_label_auroc": per, "per_label_accuracy": [accuracy_score(y[:, c], p[:, c] > 0.5) for c in range(k)],
    "auroc_macro": float(np.mean(defined)), "auroc_micro": roc_auc_score(y.ravel(), p.ravel()),
}

n, k = 60, 4
cls = rng.integers(0, k, n)
logits = rng.integers(-2, 3, (n, k)).astype(np.float64)
logits[np.arange(n), cls] += 1.5
pr = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
pr32 = pr.astype(np.float32)
out["multiclass"] = {
    "probs": pr32.ravel().tolist(), "targets": cls.tolist(), "k": k,
    "accuracy": accuracy_score(cls, pr32.argmax(1)),
    "auroc_macro": roc_auc_score(cls, pr32.astype(np.float64) / pr32.astype(np.float64).sum(1, keepdims=True),
                                 multi_class="ovr", average="macro"),
}
root = Path(__file__).resolve().parent.parent
(root / "tests/fixtures/probe/metrics.json").write_text(json.dumps(out) + "\n")
print({c: {m: v for m, v in out[c].items() if "auroc" in m or m == "accuracy"} for c in ("binary", "multilabel", "multiclass")})
