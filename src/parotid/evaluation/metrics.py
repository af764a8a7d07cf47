"""Metric wrappers over scikit-learn, percentile bootstrap CIs and calibration (ECE).

Conventions: ``y`` integer class indices, ``prob`` (n, classes) probabilities (rows sum to 1);
binary tasks use ``score`` = probability / score of the positive (malignant) class.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, roc_auc_score,
                             roc_curve, precision_recall_curve)
from sklearn.preprocessing import label_binarize


def binary_metrics(y: np.ndarray, score: np.ndarray, pred: np.ndarray | None = None, threshold: float = 0.5) -> dict:
    """Accuracy, ROC-AUC, PR-AUC (average precision), sensitivity, specificity for y in {0, 1}."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, float)
    pred = (score >= threshold).astype(int) if pred is None else np.asarray(pred).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "roc_auc": float(roc_auc_score(y, score)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, score)) if both else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
    }


def multiclass_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    """Accuracy, macro / micro one-vs-rest ROC-AUC and per-class AUC (classes absent from y are skipped)."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    n = prob.shape[1]
    present = [c for c in range(n) if 0 < np.sum(y == c) < len(y)]
    Y = label_binarize(y, classes=list(range(n)))
    if n == 2:
        Y = np.column_stack([1 - Y[:, 0], Y[:, 0]])
    per_class = {c: float(roc_auc_score(Y[:, c], prob[:, c])) for c in present}
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    micro = float(roc_auc_score(Y[:, present].ravel(), prob[:, present].ravel())) if present else float("nan")
    return {"accuracy": float(accuracy_score(y, prob.argmax(1))), "macro_auc": macro, "micro_auc": micro,
            "per_class_auc": per_class}


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum_b |B|/n * |acc(B) - conf(B)| over equal-width confidence bins (0, 1]."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    if prob.ndim == 1:
        prob = np.column_stack([1 - prob, prob])
    conf = prob.max(1)
    correct = (prob.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(y, prob, n_bins: int = 10):
    """(bin centres, accuracy, confidence, count) for the reliability diagram."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    if prob.ndim == 1:
        prob = np.column_stack([1 - prob, prob])
    conf, correct = prob.max(1), (prob.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out.append(((lo + hi) / 2, correct[m].mean() if m.any() else np.nan, conf[m].mean() if m.any() else np.nan, int(m.sum())))
    return np.array(out)


def bootstrap_ci(metric_fn, *arrays, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap: (point estimate, lower, upper) of ``metric_fn(*arrays)`` resampling cases
    with replacement (fixed seed). Resamples where the metric is undefined (NaN, e.g. one class only)
    are dropped."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    point = float(metric_fn(*arrays))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            try:
                v = float(metric_fn(*(a[idx] for a in arrays)))
            except ValueError:
                continue
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def binary_report(y, score, pred=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Binary metrics, each as (value, lo, hi) with percentile bootstrap 95 % CIs."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, float)
    pred = (score >= 0.5).astype(int) if pred is None else np.asarray(pred).astype(int)
    out = {}
    for k in ("accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity"):
        out[k] = bootstrap_ci(lambda a, b, c, k=k: binary_metrics(a, b, c)[k], y, score, pred, n_boot=n_boot, seed=seed)
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    return out


def curves(y, score):
    fpr, tpr, _ = roc_curve(y, score)
    prec, rec, _ = precision_recall_curve(y, score)
    return (fpr, tpr), (rec, prec)
