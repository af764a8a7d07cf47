"""Metric wrappers cross-checked against scikit-learn and hand-computed values."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from before_refactor import old_reliability_bins
from parotid.evaluation.metrics import (binary_metrics, binary_report, bootstrap_ci, expected_calibration_error,
                                        multiclass_metrics, reliability_bins)


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    s = np.array([0.1, 0.6, 0.2, 0.9, 0.4, 0.8, 0.7, 0.3])
    m = binary_metrics(y, s)
    # predictions at 0.5: [0,1,0,1,0,1,1,0] -> TP 3, FN 1, TN 3, FP 1
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s))
    # AUC by pair counting: positives (0.9,0.4,0.8,0.7) vs negatives (0.1,0.6,0.2,0.3)
    pairs = sum((p > q) + 0.5 * (p == q) for p in s[y == 1] for q in s[y == 0])
    assert m["roc_auc"] == pytest.approx(pairs / 16)


def test_multiclass_macro_micro_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200)
    p[np.arange(200), y] += 0.5
    p /= p.sum(1, keepdims=True)
    m = multiclass_metrics(y, p)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    Y = np.eye(4)[y]
    assert m["micro_auc"] == pytest.approx(roc_auc_score(Y, p, average="micro"))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))


def test_ece_hand_computed():
    y = np.array([1, 0, 1, 1])
    p = np.array([[0.1, 0.9], [0.2, 0.8], [0.4, 0.6], [0.35, 0.65]])
    # top-label confidences .9 (right), .8 (wrong), .6 (right), .65 (right), one per bin
    # (0.8,0.9], (0.7,0.8], (0.5,0.6], (0.6,0.7]: ECE = 1/4 (|1-.9| + |0-.8| + |1-.6| + |1-.65|)
    expected = 0.25 * (0.1 + 0.8 + 0.4 + 0.35)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)
    # binary score form equals the 2-column form
    assert expected_calibration_error(y, p[:, 1]) == pytest.approx(expected)
    b = reliability_bins(y, p)
    assert b[:, 3].sum() == 4


def test_ece_perfectly_calibrated_is_small():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1, 20000)
    y = (rng.random(20000) < conf).astype(int)
    assert expected_calibration_error(y, conf) < 0.02


def test_bootstrap_percentile_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 400)
    point, lo, hi = bootstrap_ci(np.mean, x, n_boot=2000, seed=3)
    assert point == pytest.approx(x.mean())
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se + 0.01)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se + 0.01)
    # fixed seed -> reproducible; and it is the percentile of the resampled means
    assert bootstrap_ci(np.mean, x, n_boot=2000, seed=3) == (point, lo, hi)
    r = np.random.default_rng(3)
    means = [x[r.integers(0, 400, 400)].mean() for _ in range(2000)]
    assert lo == pytest.approx(np.percentile(means, 2.5))
    assert hi == pytest.approx(np.percentile(means, 97.5))


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0] * 19 + [1])
    s = np.linspace(0, 1, 20)
    point, lo, hi = bootstrap_ci(lambda a, b: roc_auc_score(a, b) if len(set(a)) == 2 else np.nan, y, s, n_boot=200)
    assert point == 1.0 and lo <= hi


def test_binary_report_structure():
    y = np.array([0, 1] * 20)
    s = np.clip(y * 0.6 + np.linspace(0, 0.39, 40), 0, 1)
    r = binary_report(y, s, n_boot=100)
    assert r["roc_auc"][0] == pytest.approx(roc_auc_score(y, s))
    assert np.array(r["confusion_matrix"]).sum() == 40


def test_reliability_bins_equal_the_hand_written_ones():
    """sklearn's calibration_curve gives the same bins (edges included: a confidence of exactly 0.7 is in
    (0.6, 0.7]), the same counts and empty bins, and the same means up to summation order."""
    rng = np.random.default_rng(0)
    for t in range(100):
        n, k = rng.integers(5, 80), rng.integers(2, 5)
        p = rng.dirichlet(np.ones(k) * rng.uniform(0.2, 3), n)
        if t % 3 == 0:  # confidences on the bin edges
            p = np.round(p, 1)
            p /= p.sum(1, keepdims=True)
        y = rng.integers(0, k, n)
        new, old = reliability_bins(y, p), old_reliability_bins(y, p)
        assert np.array_equal(new[:, [0, 3]], old[:, [0, 3]]) and np.array_equal(np.isnan(new), np.isnan(old))
        assert np.allclose(new, old, rtol=1e-12, atol=0, equal_nan=True)
    edge = np.array([[0.3, 0.7], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0], [0.4, 0.6]])
    for y in ([1, 0, 1, 1, 0], [1, 1, 1, 1, 1]):  # confidences on bin edges; all correct: one class
        assert np.array_equal(reliability_bins(y, edge), old_reliability_bins(y, edge), equal_nan=True)
