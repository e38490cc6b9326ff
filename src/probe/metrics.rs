//! Evaluation metrics of the downstream tasks: accuracy at 0.5 and the area under the ROC curve,
//! equal to scikit-learn's `accuracy_score(y, p > 0.5)` and `roc_auc_score` (tests/suite/probe_metrics.rs).
//!
//! Defined behaviour where scikit-learn raises: a label whose true values are all one class has
//! no ROC curve; its AUROC is `None` (JSON null), it is left out of the macro average, and the
//! report says how many labels were left out.

use serde::Serialize;

/// Area under the ROC curve of `scores` for binary `labels`, ties counted half (the trapezoidal
/// ROC area, as scikit-learn). `None` when the labels are all positive or all negative.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Walk groups of equal scores from low to high: each positive beats the negatives below
    // its group and ties half of those inside it.
    let (mut neg_below, mut sum) = (0f64, 0f64);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        let (mut p, mut n) = (0f64, 0f64);
        while j < idx.len() && scores[idx[j]] == scores[idx[i]] {
            if labels[idx[j]] {
                p += 1.0;
            } else {
                n += 1.0;
            }
            j += 1;
        }
        sum += p * (neg_below + n / 2.0);
        neg_below += n;
        i = j;
    }
    Some(sum / (pos as f64 * neg as f64))
}

/// Fraction of `probs > 0.5` that equal `labels` (torchmetrics' and the reference's threshold
/// rule: exactly 0.5 counts as negative).
pub fn accuracy(probs: &[f32], labels: &[bool]) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let right = probs
        .iter()
        .zip(labels)
        .filter(|(&p, &l)| (p > 0.5) == l)
        .count();
    right as f64 / probs.len() as f64
}

/// What kind of target a task has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// One 0/1 target.
    Binary,
    /// One of K classes.
    Multiclass,
    /// K independent 0/1 targets.
    Multilabel,
}

/// One label's (or class's, one-vs-rest) numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelMetrics {
    pub name: String,
    pub positives: usize,
    pub accuracy: f64,
    pub auroc: Option<f64>,
}

/// A whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub task: TaskKind,
    pub samples: usize,
    /// Binary: at 0.5. Multilabel: over all (sample, label) pairs, as the reference. Multiclass:
    /// argmax.
    pub accuracy: f64,
    /// Mean of the defined per-label (per-class, one-vs-rest) AUROCs.
    pub auroc_macro: Option<f64>,
    /// Multilabel: AUROC of all (sample, label) pairs pooled, the reference's `auc`.
    pub auroc_micro: Option<f64>,
    /// Labels whose AUROC is undefined (one class only) and left out of the macro average.
    pub undefined_labels: usize,
    pub per_label: Vec<LabelMetrics>,
}

impl Metrics {
    /// The number a run is judged by: the reference's AUC (micro for multilabel, else macro).
    pub fn auc(&self) -> Option<f64> {
        match self.task {
            TaskKind::Multilabel => self.auroc_micro,
            _ => self.auroc_macro,
        }
    }
}

fn macro_mean(per: &[LabelMetrics]) -> (Option<f64>, usize) {
    let defined: Vec<f64> = per.iter().filter_map(|l| l.auroc).collect();
    let undefined = per.len() - defined.len();
    if defined.is_empty() {
        (None, undefined)
    } else {
        (
            Some(defined.iter().sum::<f64>() / defined.len() as f64),
            undefined,
        )
    }
}

/// Evaluate `probs` (`[n, k]` row-major: sigmoid probabilities for binary (k = 1) and
/// multilabel, softmax probabilities for multiclass) against `targets` (`[n, k]` 0/1 for
/// binary/multilabel, `[n]` class indices for multiclass).
pub fn evaluate(
    task: TaskKind,
    names: &[String],
    probs: &[f32],
    targets: &[f32],
    k: usize,
) -> Metrics {
    let n = probs.len() / k.max(1);
    let column = |c: usize| -> Vec<f32> { (0..n).map(|i| probs[i * k + c]).collect() };
    match task {
        TaskKind::Binary | TaskKind::Multilabel => {
            let y: Vec<bool> = targets.iter().map(|&t| t > 0.5).collect();
            let per: Vec<LabelMetrics> = (0..k)
                .map(|c| {
                    let p = column(c);
                    let yc: Vec<bool> = (0..n).map(|i| y[i * k + c]).collect();
                    LabelMetrics {
                        name: names
                            .get(c)
                            .cloned()
                            .unwrap_or_else(|| format!("label_{c}")),
                        positives: yc.iter().filter(|&&v| v).count(),
                        accuracy: accuracy(&p, &yc),
                        auroc: auroc(&p, &yc),
                    }
                })
                .collect();
            let (auroc_macro, undefined_labels) = macro_mean(&per);
            Metrics {
                task,
                samples: n,
                accuracy: accuracy(probs, &y),
                auroc_macro,
                auroc_micro: (task == TaskKind::Multilabel)
                    .then(|| auroc(probs, &y))
                    .flatten(),
                undefined_labels,
                per_label: per,
            }
        }
        TaskKind::Multiclass => {
            let class: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
            let right = (0..n)
                .filter(|&i| {
                    let row = &probs[i * k..(i + 1) * k];
                    let arg = (0..k)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap_or(0);
                    arg == class[i]
                })
                .count();
            let per: Vec<LabelMetrics> = (0..k)
                .map(|c| {
                    let p = column(c);
                    let yc: Vec<bool> = class.iter().map(|&t| t == c).collect();
                    LabelMetrics {
                        name: names
                            .get(c)
                            .cloned()
                            .unwrap_or_else(|| format!("class_{c}")),
                        positives: yc.iter().filter(|&&v| v).count(),
                        accuracy: accuracy(&p, &yc),
                        auroc: auroc(&p, &yc),
                    }
                })
                .collect();
            let (auroc_macro, undefined_labels) = macro_mean(&per);
            Metrics {
                task,
                samples: n,
                accuracy: if n == 0 { 0.0 } else { right as f64 / n as f64 },
                auroc_macro,
                auroc_micro: None,
                undefined_labels,
                per_label: per,
            }
        }
    }
}

/// The metrics as a text table (what `probe` and `finetune` print).
pub fn table(m: &Metrics) -> String {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    let mut s = format!(
        "{:?} task, {} samples: accuracy {:.4}, AUROC macro {}{}\n",
        m.task,
        m.samples,
        m.accuracy,
        f(m.auroc_macro),
        m.auroc_micro
            .map(|v| format!(", micro {v:.4}"))
            .unwrap_or_default()
    );
    if m.undefined_labels > 0 {
        s += &format!(
            "({} label(s) have one class only in this split: AUROC undefined, left out of the macro average)\n",
            m.undefined_labels
        );
    }
    if m.per_label.len() > 1 {
        s += &format!(
            "{:<28} {:>9} {:>9} {:>8}\n",
            "label", "positives", "accuracy", "AUROC"
        );
        for l in &m.per_label {
            s += &format!(
                "{:<28} {:>9} {:>9.4} {:>8}\n",
                l.name,
                l.positives,
                l.accuracy,
                f(l.auroc)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_values() {
        // Perfect, reversed, all tied.
        assert_eq!(auroc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(auroc(&[0.5, 0.5, 0.5], &[false, true, true]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.7], &[true, true]), None);
        assert_eq!(accuracy(&[0.5, 0.51], &[true, true]), 0.5);
    }
}
