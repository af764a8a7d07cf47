"""Serving many clients: no hook leak per Grad-CAM request, a free event loop under load (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SAMPLE

CKPT = ROOT / "apps" / "parotid" / "model" / "classify_subtype.pt"


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_gradcam_leaves_no_hooks_and_same_heatmap():
    """Each heatmap request used to leave a forward and a backward hook per branch on the cached model
    (MONAI's ModelWithHooks keeps no handles): the count must not grow and the map must not change."""
    from parotid.classification.predict import classify
    from parotid.classification.train import load_checkpoint
    from parotid.study import read_study

    model, cfg = load_checkpoint(str(CKPT))
    objects = json.loads((SAMPLE / "datastore_v2.json").read_text())["objects"]
    sid = sorted(objects)[0]
    roi = objects[sid]["labels"]["final"]["info"]["roi"]
    study = read_study(str(SAMPLE / objects[sid]["image"]["info"].get("name", f"{sid}.nii.gz")))
    before = _hook_count(model)
    first = classify(model, cfg, study, roi)[1]
    for _ in range(3):
        result, vol = classify(model, cfg, study, roi)
    assert _hook_count(model) == before
    np.testing.assert_array_equal(vol, first)
    _, plain = classify(model, cfg, study, roi, heatmap_mode="gradcam")  # the other mode too
    assert _hook_count(model) == before and plain.max() == pytest.approx(1.0)
