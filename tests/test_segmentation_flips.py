"""Test-time mirroring of the served whole-study segmentation (`inference.mirror_flips`): the served label is
the argmax of the class probabilities averaged over the study and its left-right mirror, recomputed here with
MONAI's sliding window and torch.flip directly; it is not the single-pass label of before; the mirror axis is
the one closest to the patient's left-right whatever the study's orientation; the active-learning score sees
the served label; and `parotid.segmentation.flip_eval` (the figures in docs/results/seg_tta_rule.txt)
measures the served path. Real served checkpoint, real bundled sample studies (SYNTHETIC)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import SlidingWindowInferer

from conftest import APP, SAMPLE
from parotid.labels import GLAND, TUMOR
from parotid.model_space import to_model_space
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.inference import (SINGLE_PASS, clean_label, dice, left_right_axis, mirror_flips,
                                            segment_study, segment_with_uncertainty, study_input)
from parotid.study import read_label_map, read_study, study_from_array

SID = "syn7_0000"


@pytest.fixture(scope="module")
def served():
    ck = load_segmentation(str(APP / "model" / "segmentation.pt"))
    study = read_study(str(SAMPLE / f"{SID}.nii.gz"), SID)
    space = to_model_space(study, ck.spacing)
    net = ck.network_for(study.sequences)[1]
    image = torch.from_numpy(study_input(space.model_study, ck.spec))[None]
    inferer = SlidingWindowInferer(roi_size=ck.spec.patch, sw_batch_size=2, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        as_is = torch.softmax(inferer(image, net), 1)[0]
        # this synthetic study is axial: its I axis is the patient's left-right (torch dim 2 of (1, C, I, J, K))
        mirrored = torch.flip(torch.softmax(inferer(torch.flip(image, (2,)), net), 1), (2,))[0]

    def on_study(p: torch.Tensor) -> np.ndarray:  # model grid -> study grid, as the served path does
        p = p.numpy()
        if not space.resampled:
            return clean_label(p.argmax(0).astype(np.uint8))
        return clean_label(space.values_to_study(p).argmax(0).astype(np.uint8),
                           min_voxels=max(1, int(round(20 * space.voxel_ratio()))))

    return ck, study, net, space, on_study((as_is + mirrored) / 2), on_study(as_is)


def test_the_served_label_averages_the_study_and_its_left_right_mirror(served):
    ck, study, net, _, mirrored, single = served
    label, _ = segment_study(net, ck.spec, study, ck.spacing)
    assert np.array_equal(label, mirrored)
    assert (label != single).sum() > 0  # so this test tells the two apart
    assert np.array_equal(segment_study(net, ck.spec, study, ck.spacing, SINGLE_PASS)[0], single)


@pytest.mark.parametrize("columns, axis", [((0, 1, 2), 0), ((1, 0, 2), 1), ((2, 1, 0), 2)])
def test_the_mirror_axis_is_the_patients_left_right_whatever_the_orientation(served, columns, axis):
    """Axial (I = left-right), axial with I and J swapped (J = left-right), sagittal-like (K = left-right):
    the same voxels on a grid whose direction columns are permuted."""
    _, study, *_ = served
    ref = sitk.Image(study.reference)
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    ref.SetDirection(tuple(d[:, list(columns)].ravel()))
    turned = study_from_array(study.array(), study.sequences, ref)
    assert left_right_axis(turned) == axis
    assert mirror_flips(turned) == ((), (2 + axis,))


def test_the_active_learning_score_sees_the_served_label(served):
    ck, _, net, space, _, _ = served
    label, _ = segment_with_uncertainty(net, ck.spec, study_input(space.model_study, ck.spec),
                                        mirror_flips(space.model_study))
    served_model_grid, _ = segment_study(net, ck.spec, space.model_study, None)
    assert np.array_equal(label, served_model_grid)


def test_flip_eval_measures_the_served_path(served, tmp_path):
    from parotid.segmentation.flip_eval import main

    ck, study, net, _, mirrored, single = served
    truth = read_label_map(str(SAMPLE / "labels" / "final" / f"{SID}.nii.gz"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"validation_ids": [SID]}))
    out = tmp_path / "flips.json"
    assert main(["--checkpoint", str(APP / "model" / "segmentation.pt"), "--cohort", str(SAMPLE), "--ids", str(ids),
                 "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["synthetic"] and [r["id"] for r in res["rows"]] == [SID]
    row = res["rows"][0]
    for variant, label in (("mirror_lr", mirrored), ("single", single)):
        assert row[variant]["tumor"] == pytest.approx(dice(label == TUMOR, truth == TUMOR))
        assert row[variant]["gland"] == pytest.approx(dice(label == GLAND, truth == GLAND))
    assert res["summary"]["all"]["n"] == 1
