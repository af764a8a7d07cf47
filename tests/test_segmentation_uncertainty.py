"""The segmentation's active-learning scores (test-time flips) on a real sample study with the served
checkpoint: the tumour score is a flip variance when a tumour is predicted, and the fixed top score when
none is (a study where the model finds no tumour is proposed first for tumour annotation). Data SYNTHETIC
(bundled sample study)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import APP, SAMPLE
from parotid.labels import TUMOR
from parotid.model_space import label_to_model, to_model_space
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.inference import NO_TUMOUR_SCORE, dice, segment_with_uncertainty, study_input
from parotid.study import read_label_map, read_study

SID = "syn7_0000"
MAX_FLIP_VARIANCE = 8 / 9  # 4 flips, 3 classes: sum over classes of the unbiased variance of a probability


@pytest.fixture(scope="module")
def served():
    ck = load_segmentation(str(APP / "model" / "segmentation.pt"))
    study = read_study(str(SAMPLE / f"{SID}.nii.gz"), SID)
    space = to_model_space(study, ck.spacing)
    return ck, space, study_input(space.model_study, ck.spec)


def test_a_predicted_tumour_gets_its_own_flip_variance(served):
    ck, space, image = served
    label, flips = segment_with_uncertainty(ck.network_for(space.model_study.sequences)[1], ck.spec, image)
    truth = label_to_model(read_label_map(str(SAMPLE / "labels" / "final" / f"{SID}.nii.gz")), space)
    assert dice(label == TUMOR, truth == TUMOR) > 0.7  # the served model finds this study's tumour
    assert 0 < flips.tumour < MAX_FLIP_VARIANCE and 0 < flips.foreground < MAX_FLIP_VARIANCE
    assert flips.tumour != flips.foreground  # a score of its own, not the gland-dominated one


def test_no_predicted_tumour_ranks_first(served):
    """Twin of the above: the same real network with its output layer set to answer background
    everywhere (weights zeroed, background bias 1) predicts no tumour."""
    ck, space, image = served
    net = ck.network_for(space.model_study.sequences)[1]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out_w = [k for k in state if k.endswith("conv.weight")][-1]  # the output layer: the last convolution
    out_b = [k for k in state if k.endswith("conv.bias")][-1]
    state[out_w] = torch.zeros_like(state[out_w])
    state[out_b] = torch.tensor([1.0, 0.0, 0.0])
    blind = copy.deepcopy(net)
    blind.load_state_dict(state)
    label, flips = segment_with_uncertainty(blind, ck.spec, image)
    assert not np.any(label == TUMOR)
    assert flips.tumour == NO_TUMOUR_SCORE > MAX_FLIP_VARIANCE and flips.foreground == 0.0


def test_the_ranking_measure_runs_on_a_cohort(tmp_path):
    """`python -m parotid.segmentation.uncertainty_eval` (the measure quoted in docs/annotator.md) on 3 sample
    studies: one row per study and checkpoint, both scores summarised."""
    import json

    from parotid.segmentation.uncertainty_eval import main

    out = tmp_path / "ranking.json"
    assert main(["--cohort", str(SAMPLE), "--checkpoints", str(APP / "model" / "segmentation.pt"), "--limit", "3",
                 "--top", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["per_study"][str(APP / "model" / "segmentation.pt")]
    assert len(rows) == 3 and len({r["study"] for r in rows}) == 3
    assert all(0 <= r["dice_tumor"] <= 1 and 0 <= r["seg_tumour_tta_variance"] <= NO_TUMOUR_SCORE for r in rows)
    summary = res["summary"][str(APP / "model" / "segmentation.pt")]
    assert set(summary) == {"seg_tta_variance", "seg_tumour_tta_variance"}
    assert all(s["n"] == 3 and -1 <= s["spearman_tumour_error"] <= 1 for s in summary.values())
