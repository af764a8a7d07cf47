"""Metric wrappers over scikit-learn, DeLong and percentile bootstrap CIs, and calibration (ECE).

Conventions: ``y`` integer class indices, ``prob`` (n, classes) probabilities (rows sum to 1);
binary tasks use ``score`` = probability / score of the positive (malignant) class.

CIs as in seed 003: ROC-AUC by DeLong's method, everything else by percentile bootstrap.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score, roc_curve, precision_recall_curve)
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


def delong_auc_ci(y, score, alpha: float = 0.05) -> tuple[float, float, float]:
    """ROC-AUC with DeLong's 95 % CI: (auc, lower, upper), the interval clipped to [0, 1].

    DeLong, DeLong & Clarke-Pearson (Biometrics 1988) variance of the Mann-Whitney AUC from its
    structural components, computed with the midrank algorithm of Sun & Xu (IEEE SPL 2014), O(n log n).
    Hand-written: scikit-learn, scipy and the other installed packages have no DeLong variance
    (checked: scikit-learn 1.9, scipy 1.17, MONAI 1.4, torchmetrics absent); tests compare it with the
    O(n^2) definition and with a bootstrap."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, float)
    pos, neg = score[y == 1], score[y == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    tz = rankdata(np.concatenate([pos, neg]))  # midranks in the pooled sample
    v10 = (tz[:m] - rankdata(pos)) / n  # per positive: fraction of negatives it outranks (ties 1/2)
    v01 = 1.0 - (tz[m:] - rankdata(neg)) / m  # per negative: fraction of positives outranking it
    auc = float(v10.mean())
    se = float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))
    z = norm.ppf(1 - alpha / 2)
    return auc, float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))


def youden_threshold(y, score) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 on (y, score) (seed 003's
    operating point); predictions are ``score >= threshold``."""
    fpr, tpr, thr = roc_curve(np.asarray(y).astype(int), np.asarray(score, float))
    ok = np.isfinite(thr)
    j = np.where(ok, tpr - fpr, -np.inf)
    return float(thr[int(np.argmax(j))])


def per_class_prf(y, pred, classes) -> dict:
    """Precision, recall (sensitivity) and F1 of each class and their macro average (seed 004)."""
    labels = list(range(len(classes)))
    p, r, f, n = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
           for i, c in enumerate(classes)}
    mp, mr, mf, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    out["macro"] = {"precision": float(mp), "recall": float(mr), "f1": float(mf), "support": int(n.sum())}
    return out


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


def _top_label(y, prob) -> tuple[np.ndarray, np.ndarray]:
    """(top-label confidence, 1.0 where the top label is right) for labels `y` and class probabilities
    (N, C), or the positive-class probability (N,) of a binary task."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    if prob.ndim == 1:
        prob = np.column_stack([1 - prob, prob])
    return prob.max(1), (prob.argmax(1) == y).astype(float)


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: sum_b |B|/n * |acc(B) - conf(B)| over equal-width confidence bins (0, 1]."""
    conf, correct = _top_label(y, prob)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(y, prob, n_bins: int = 10):
    """(bin centres, accuracy, confidence, count) for the reliability diagram: top-label confidence in
    equal-width bins (0, 1] (``sklearn.calibration.calibration_curve`` on correct-vs-confidence; empty
    bins NaN). ``expected_calibration_error`` keeps its own loop so that reported ECE values stay the
    same to the last bit (calibration_curve's bin means differ from numpy means by ~1e-16)."""
    from sklearn.calibration import calibration_curve

    conf, correct = _top_label(y, prob)
    edges = np.linspace(0, 1, n_bins + 1)
    count = np.bincount(np.searchsorted(edges[1:-1], conf), minlength=n_bins)  # calibration_curve's bins
    acc, mean_conf = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    acc[count > 0], mean_conf[count > 0] = calibration_curve(correct.astype(int), conf, n_bins=n_bins, pos_label=1)
    return np.column_stack([(edges[:-1] + edges[1:]) / 2, acc, mean_conf, count])


def bootstrap_ci(metric_fn, *arrays, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap: (point estimate, lower, upper) of ``metric_fn(*arrays)`` resampling cases
    with replacement (fixed seed). Resamples where the metric is undefined (NaN, e.g. one class only)
    are dropped.

    Not ``scipy.stats.bootstrap``: it draws the same resamples from the same generator (checked: same CI
    to ~1e-16 for a mean), but cannot drop undefined resamples (a resample with one class has no AUC:
    scipy's interval becomes NaN) nor share resamples between metrics (``bootstrap_cis``)."""
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


def bootstrap_cis(metrics_fn, keys, *arrays, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """``bootstrap_ci`` for several metrics of one function (a dict) on the SAME resamples, computing the
    function once per resample: {key: (point, lower, upper)}, equal to one ``bootstrap_ci`` per key."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    point = metrics_fn(*arrays)
    rng = np.random.default_rng(seed)
    vals: dict = {k: [] for k in keys}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        with np.errstate(all="ignore"):
            try:
                m = metrics_fn(*(a[idx] for a in arrays))
            except ValueError:
                continue
        for k in keys:
            v = float(m[k])
            if np.isfinite(v):
                vals[k].append(v)
    out = {}
    for k in keys:
        if not vals[k]:
            out[k] = (float(point[k]), float("nan"), float("nan"))
            continue
        lo, hi = np.percentile(vals[k], [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[k] = (float(point[k]), float(lo), float(hi))
    return out


def binary_report(y, score, pred=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Binary metrics, each as (value, lo, hi): ROC-AUC with DeLong's 95 % CI, the others with percentile
    bootstrap 95 % CIs."""
    y = np.asarray(y).astype(int)
    score = np.asarray(score, float)
    pred = (score >= 0.5).astype(int) if pred is None else np.asarray(pred).astype(int)
    out = {"roc_auc": delong_auc_ci(y, score)}
    out.update(bootstrap_cis(binary_metrics, ("accuracy", "pr_auc", "sensitivity", "specificity"), y, score, pred,
                             n_boot=n_boot, seed=seed))
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    out["ci_method"] = {"roc_auc": "DeLong", "others": f"percentile bootstrap ({n_boot} resamples, seed {seed})"}
    return out


def prf_report(y, pred, classes, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-class precision / recall / F1 (point values) and their macro averages with percentile bootstrap
    95 % CIs (seed 004's measures)."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    out = per_class_prf(y, pred, classes)
    out["macro"].update(bootstrap_cis(lambda a, b: per_class_prf(a, b, classes)["macro"], ("precision", "recall", "f1"),
                                      y, pred, n_boot=n_boot, seed=seed))
    return out


def curves(y, score):
    fpr, tpr, _ = roc_curve(y, score)
    prec, rec, _ = precision_recall_curve(y, score)
    return (fpr, tpr), (rec, prec)
