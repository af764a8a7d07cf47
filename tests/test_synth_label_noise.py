"""`parotid.synth.label_noise`: the Dice between a malignant tumour's label shape and its shape without the
generator's fine boundary perturbation (the figure behind docs/model-card-segmentation.md "Malignant tumours
and the generator's labels"). Real generator geometry (SYNTHETIC); studies picked from seed 527."""

from __future__ import annotations

import json

import pytest

from parotid.synth.label_noise import main, smooth_shape_dice

ILL_DEFINED, WELL_DEFINED = ("syn527_0028", 28), ("syn527_0022", 22)  # malignant, with / without the perturbation


def test_an_ill_defined_malignant_label_is_far_from_its_smooth_shape():
    r = smooth_shape_dice(527, ILL_DEFINED[1])
    assert r["id"] == ILL_DEFINED[0] and r["fine_perturbation"] and r["ill_defined"]
    assert 0.5 < r["dice_label_vs_smooth_shape"] < 0.9


def test_a_well_defined_malignant_label_is_its_smooth_shape():
    r = smooth_shape_dice(527, WELL_DEFINED[1])
    assert r["id"] == WELL_DEFINED[0] and not r["fine_perturbation"]
    assert r["dice_label_vs_smooth_shape"] == 1.0


def test_other_classes_are_skipped_and_model_rows_are_joined(tmp_path):
    benign = next(i for i in range(10) if smooth_shape_dice(527, i) is None)
    rows = tmp_path / "flips.json"
    rows.write_text(json.dumps({"rows": [{"id": ILL_DEFINED[0], "subset": "all", "mirror_lr": {"tumor": 0.7, "gland": 0.9}}]}))
    out = tmp_path / "noise.json"
    assert main(["--cohorts", f"527:{ILL_DEFINED[1] + 1}", "--rows", str(rows), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ids = [r["id"] for r in res["rows"]]
    assert f"syn527_{benign:04d}" not in ids and ILL_DEFINED[0] in ids and WELL_DEFINED[0] in ids
    joined = [r for r in res["rows"] if "model_dice_tumor" in r]
    assert [r["id"] for r in joined] == [ILL_DEFINED[0]] and joined[0]["model_dice_tumor"] == pytest.approx(0.7)
    assert res["synthetic"] and res["summary"]["fine_perturbation"]["n_with_model"] == 1
