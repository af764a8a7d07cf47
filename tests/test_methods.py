"""Methods as the seed papers describe them (issue 12, item 5): 001's slice-to-patient rule on unique
tumour slices and its slice-level metrics; 003's Youden threshold and DeLong CI; 004's per-class
precision / recall / F1. No server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from parotid.classification.crops import extract_crop, unique_slices
from parotid.classification.data import CropSet
from parotid.labels import get_label_set
from parotid.sequences import SEQUENCE_KEYS

torch.set_num_threads(1)


class _BrightIsMalignant(nn.Module):
    """A stand-in slice classifier: bright slices (channel 0 mean > 0.5) malignant, others pleomorphic
    adenoma; classes = subtype4 + tumour-free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0].mean((-1, -2)) > 0.5).float()
        logits = torch.full((len(x), 5), -5.0)
        logits[:, 3] = 5.0 * bright
        logits[:, 0] = 5.0 * (1 - bright)
        return logits


def _thin_tumour_cropset() -> CropSet:
    """One study whose tumour spans 2 slices (k = 5, 6), cut into 8 crops as the classifiers do:
    4 repeats of each; slice 6 looks malignant, slice 5 benign."""
    C, S, N = len(SEQUENCE_KEYS), 16, 8
    arr = np.zeros((C, 40, 40, 12), np.float32)
    arr[:, 10:30, 10:30, 5] = 1.0
    arr[:, 10:30, 10:30, 6] = 3.0
    crop = extract_crop(arr, [12, 28, 12, 28, 5, 7], S, N)
    assert list(crop.ks) == [5, 5, 5, 5, 6, 6, 6, 6]
    slices = crop.slices.copy()
    slices[crop.ks == 5] = 0.0
    slices[crop.ks == 6] = 1.0
    return CropSet(["thin"], ["malignant"], tuple(SEQUENCE_KEYS), slices[None].astype(np.float16),
                   np.zeros((1, N, 1, S, S), np.uint8), np.zeros((1, 1, C, S, S), np.float16),
                   np.zeros((1, 1, 1, S, S), np.uint8), np.zeros((1, 1), bool), crop.box[None],
                   np.zeros((1, 3), np.float32), np.ones((1, C), bool), crop.ks[None])


def test_unique_slices_drops_repeats():
    assert list(unique_slices([5, 5, 5, 5, 6, 6, 6, 6])) == [0, 4]
    assert list(unique_slices([2, 3, 4])) == [0, 1, 2]


def test_rule_001_counts_unique_tumour_slices_not_repeats():
    """A 2-slice tumour with ONE malignant slice: 001's rule (> 2 malignant slices) says benign.
    Counting the 8 resampled crops (4 repeats of the malignant slice) made it malignant."""
    from parotid.classification.slice_classifier import predict_patients_001

    ls = get_label_set("subtype4")
    cs = _thin_tumour_cropset()
    out = predict_patients_001(_BrightIsMalignant(), cs, [0], list(SEQUENCE_KEYS), False, ls)
    assert ls.classes[out.rule[0]] == "pleomorphic_adenoma"
    # probability averaging also weighs each slice once: one benign, one malignant slice -> 0.5 / 0.5
    assert out.prob[0, 3] == np.float32(out.prob[0, 0])
    # slice level: 2 unique tumour slices (no tumour-free crops here), labelled with the patient's class
    assert list(out.slice_y) == [3, 3] and out.slice_prob.shape == (2, 5)


def _delong_by_definition(y, s):
    """DeLong et al. (1988) from the O(n^2) kernel psi(x, y) = 1 if x > y, 1/2 if x = y, else 0."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
    v10, v01 = psi.mean(1), psi.mean(0)
    return psi.mean(), np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_delong_matches_definition_with_ties_and_hanley_mcneil_auc():
    from parotid.evaluation.metrics import delong_auc_ci

    # Hanley & McNeil (Radiology 1982) Table 1: 5-point ratings of 58 normal and 51 abnormal CT images
    neg = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    pos = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y, s = np.r_[np.zeros(58, int), np.ones(51, int)], np.r_[neg, pos].astype(float)
    auc, lo, hi = delong_auc_ci(y, s)
    assert auc == pytest.approx(0.8932, abs=1e-4)  # the published area
    ref_auc, ref_se = _delong_by_definition(y, s)
    assert auc == pytest.approx(ref_auc) and (hi - lo) / (2 * 1.959964) == pytest.approx(ref_se, rel=1e-6)
    rng = np.random.default_rng(1)
    y2 = rng.integers(0, 2, 80)
    s2 = rng.normal(y2 * 0.8, 1.0)
    a2, lo2, hi2 = delong_auc_ci(y2, s2)
    assert (hi2 - lo2) / (2 * 1.959964) == pytest.approx(_delong_by_definition(y2, s2)[1], rel=1e-6)


def test_delong_se_agrees_with_bootstrap():
    from sklearn.metrics import roc_auc_score

    from parotid.evaluation.metrics import delong_auc_ci

    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(120, int), np.ones(60, int)]
    s = rng.normal(y * 1.0, 1.0)
    auc, lo, hi = delong_auc_ci(y, s)
    boot = []
    for _ in range(2000):
        i = np.r_[rng.choice(120, 120), 120 + rng.choice(60, 60)]  # stratified: DeLong conditions on m, n
        boot.append(roc_auc_score(y[i], s[i]))
    assert (hi - lo) / (2 * 1.959964) == pytest.approx(np.std(boot), rel=0.1)
    assert lo < auc < hi


def test_youden_threshold_and_sensitivity_of_an_outlier_score():
    """003's operating point: a score that ranks well but sits below the default cut-off still detects."""
    from parotid.evaluation.metrics import binary_metrics, youden_threshold

    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.10, 0.12, 0.15, 0.2, 0.21, 0.3, 0.25, 0.4, 0.45])  # all below 0.5
    assert binary_metrics(y, s)["sensitivity"] == 0.0
    t = youden_threshold(y, s)
    assert t == pytest.approx(0.25)
    m = binary_metrics(y, s, threshold=t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(5 / 6)


def test_per_class_precision_recall_f1_and_macro():
    from parotid.evaluation.metrics import per_class_prf, prf_report

    classes = ["scc", "acc", "onb"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    r = per_class_prf(y, pred, classes)
    assert r["scc"] == {"precision": 1.0, "recall": 0.75, "f1": pytest.approx(6 / 7), "support": 4}
    assert r["acc"]["precision"] == 0.5 and r["acc"]["recall"] == 0.5
    assert r["onb"]["precision"] == pytest.approx(2 / 3) and r["onb"]["recall"] == 1.0
    assert r["macro"]["recall"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    rep = prf_report(y, pred, classes, n_boot=200)
    v, lo, hi = rep["macro"]["f1"]
    assert v == pytest.approx(r["macro"]["f1"]) and lo <= v <= hi


def test_cv_reports_the_seed_methods(tmp_path):
    """parotid-eval cv on a toy cohort: the 001-inspired row has slice-level metrics and the rule on unique
    slices, the 003-inspired row a Youden operating point (and the default offset beside it), ROC-AUC CIs are
    DeLong's, every probability row has 004's precision/recall/F1; variants are named for what they are."""
    import json

    from toy_cohort import write_toy_cohort
    from parotid.evaluation.cli import main

    write_toy_cohort(str(tmp_path / "toy"), 24)
    main(["cv", "--cohort", str(tmp_path / "toy"), "--out", str(tmp_path / "out"), "--fusion", "T2", "CET1", "ADC",
          "--single", "T2", "--variants", "resnet", "lof", "--folds", "2", "--epochs1", "1", "--resnet-epochs", "1",
          "--size", "32", "--n-boot", "50"])
    res = json.loads((tmp_path / "out" / "ablation_cv.json").read_text())["results"]
    resnet = next(v for k, v in res.items() if "inspired by 001" in k)
    lof = next(v for k, v in res.items() if "after 003" in k)
    sl = resnet["slice_level"]
    assert sl["classes"][-1] == "tumour_free" and sl["n_slices"] > sl["n_tumour_slices"] > 0
    assert len(sl["confusion_matrix"]) == 5 and 0 <= sl["accuracy"] <= 1
    assert "binary_rule_001" in resnet and "macro" in resnet["prf_rule_001"] and "macro" in resnet["prf"]
    assert set(resnet["prf"]) == {"pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant", "macro"}
    assert lof["threshold"]["method"].startswith("Youden") and "binary_default_offset" in lof
    assert lof["binary"]["ci_method"]["roc_auc"] == "DeLong"
    md = (tmp_path / "out" / "ablation_cv.md").read_text()
    assert "Youden" in md and "slice level" in md and "unique tumour slices" in md


def test_slicer_names_the_heatmap_as_the_server_does():
    from ParotidTumorLib.results import ClassificationResult

    params = {"prediction": [{"idx": 0, "label": "benign", "score": 1.0}],
              "heatmap": {"method": "Grad-CAM x RoI-Align read-out weight (layer2; hybrid map, not plain Grad-CAM)"}}
    assert ClassificationResult.from_params(params).heatmap_name.startswith("Heatmap: Grad-CAM x RoI-Align read-out")
    params["heatmap"] = {"method": "Grad-CAM (plain, layer2)"}
    assert ClassificationResult.from_params(params).heatmap_name == "Heatmap: Grad-CAM (plain, layer2)"
    assert ClassificationResult.from_params({"prediction": []}).heatmap_name == "Heatmap"


def test_holdout_reports_precision_recall_f1(tmp_path):
    """parotid-eval holdout: 004's per-class precision/recall/F1 and macro averages, DeLong CI for ROC-AUC."""
    import json

    from parotid.classification.data import build_cropset
    from toy_cohort import write_toy_cohort
    from parotid.classification.checkpoint import save_checkpoint
    from parotid.classification.task_model import train_task_model
    from parotid.evaluation.cli import main

    write_toy_cohort(str(tmp_path / "toy"), 24)
    cs = build_cropset(str(tmp_path / "toy"), size=32, n_slices=4)
    model, cfg = train_task_model(cs, "subtype4", ("T2", "CET1", "ADC"), "early", epochs1=1, epochs2=2,
                                  required=("T2", "CET1"))
    (tmp_path / "models").mkdir()
    save_checkpoint(str(tmp_path / "models" / "classify_subtype.pt"), model, {**cfg, "task": "classify_subtype"})
    main(["holdout", "--cohort", str(tmp_path / "toy"), "--models", str(tmp_path / "models"), "--tasks",
          "classify_subtype", "--out", str(tmp_path / "out"), "--n-boot", "50"])
    res = json.loads((tmp_path / "out" / "holdout.json").read_text())["results"]["classify_subtype"]
    assert set(res["prf"]) == {"pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant", "macro"}
    assert res["binary"]["ci_method"]["roc_auc"] == "DeLong"
    assert "Macro precision / recall / F1" in (tmp_path / "out" / "holdout.md").read_text()


def test_bootstrap_cis_equal_one_bootstrap_per_metric():
    from parotid.evaluation.metrics import binary_metrics, bootstrap_ci, bootstrap_cis

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    s = rng.random(40)
    p = (s > 0.5).astype(int)
    keys = ("accuracy", "pr_auc", "sensitivity", "specificity")
    many = bootstrap_cis(binary_metrics, keys, y, s, p, n_boot=200, seed=1)
    for k in keys:
        assert many[k] == bootstrap_ci(lambda a, b, c: binary_metrics(a, b, c)[k], y, s, p, n_boot=200, seed=1)
