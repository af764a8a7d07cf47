"""The held-out segmentation report's breakdown per cohort and tumour class (parotid.segmentation.subset_eval)."""

from __future__ import annotations

import pytest

from parotid.segmentation.subset_eval import breakdown, breakdown_table


def _result():
    studies = ["syn521_0000", "syn521_0001", "syn521_0002", "syn600_0000", "syn600_0001"]
    classes = ["warthin", "malignant", "malignant", "pleomorphic_adenoma", "malignant"]
    tumour = [0.90, 0.70, 0.60, 0.92, 0.80]
    gland = [0.95, 0.93, 0.91, 0.94, 0.96]
    return {"studies": studies, "tumor_classes": classes,
            "results": {"ck.pt": {"all": {"per_study_tumor": tumour, "per_study_gland": gland}}}}


def test_breakdown_groups_by_cohort_and_tumour_class():
    rows = {r["cohort"]: r for r in breakdown(_result(), "ck.pt", resamples=200)}
    assert set(rows) == {"syn521", "syn600", "all"}
    a = rows["syn521"]
    assert a["n"] == 3 and a["malignant_share"] == pytest.approx(2 / 3)
    assert a["dice_tumor"] == pytest.approx(0.7333, abs=1e-4) and a["dice_gland"] == pytest.approx(0.93)
    assert a["by_class"] == {"malignant": {"n": 2, "dice_tumor": pytest.approx(0.65)},
                             "warthin": {"n": 1, "dice_tumor": pytest.approx(0.90)}}
    assert rows["all"]["n"] == 5 and rows["all"]["dice_tumor"] == pytest.approx(0.784)
    assert rows["all"]["by_class"]["malignant"] == {"n": 3, "dice_tumor": pytest.approx(0.70)}
    lo, hi = rows["all"]["dice_tumor_ci95"]
    assert 0.60 <= lo <= 0.784 <= hi <= 0.92


def test_breakdown_table_names_every_class_and_cohort():
    res = _result()
    res["breakdown"] = {"ck.pt": breakdown(res, "ck.pt", resamples=50)}
    text = breakdown_table(res)
    assert "malignant" in text and "pleomorphic_adenoma" in text and "warthin" in text
    assert "| ck.pt | syn600 | 2 | 0.50 |" in text and "| ck.pt | all | 5 | 0.60 |" in text
    assert "0.650 (n 2)" in text
