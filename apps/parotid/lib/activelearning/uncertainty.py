"""Uncertainty scores per study, for active learning (which study should an annotator label next?).

`StudyUncertaintyScoring` (a MONAI Label ScoringMethod, run in MONAI Label's scoring subprocess on
start-up, after training and after each next-sample request) scores every study that has no final
label and stores the scores in the study's image info:

- ``seg_tta_variance``  segmentation uncertainty: variance of the class probabilities over
  test-time flips, inside the predicted gland/tumour (the UNet has no dropout layers, so flips
  stand in for MC dropout);
- ``seg_tumour_tta_variance``  the same inside the predicted tumour only (1.0, above any variance,
  when no tumour is predicted). It ranks poor tumour contours far better than the gland-dominated
  score above (docs/annotator.md, "Which study next");
- ``cls_entropy``       entropy of the calibrated class probabilities (subtype model);
- ``cls_margin``        1 - (p_top1 - p_top2): high when the two best classes are close;
- ``cls_mc_std``        std of the malignancy probability over MC-dropout passes.

The strategies rank by each score, highest first, studies served recently rotated (MONAI Label's
`Epistemic` rule, `strategies.ScoreRanked`), plus `random` and `first`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.strategies import ScoreRanked
from parotid.model_space import to_model_space
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.inference import mirror_flips, segment_with_uncertainty, study_input, tumour_roi
from parotid.segmentation.networks import SEGMENTATION
from parotid.study import StudyError, read_study

logger = logging.getLogger(__name__)
SCORE_KEYS = ("seg_tta_variance", "seg_tumour_tta_variance", "cls_entropy", "cls_margin", "cls_mc_std")


def score_study(study, seg_net, cls_model=None, cls_cfg=None, seg_spacing=None) -> Dict[str, float]:
    """All uncertainty scores of one study (classification scores need a tumour and a model). The
    segmentation model runs at its training spacing (parotid.model_space); the box goes back to the
    study grid for the classifier, which resamples on its own."""
    space = to_model_space(study, seg_spacing)
    label, flips = segment_with_uncertainty(seg_net, SEGMENTATION, study_input(space.model_study, SEGMENTATION),
                                            mirror_flips(space.model_study))  # the served label
    scores: Dict[str, float] = {"seg_tta_variance": flips.foreground, "seg_tumour_tta_variance": flips.tumour}
    roi = space.roi_to_study(tumour_roi(label))
    if cls_model is None or roi is None:
        return scores
    from parotid.classification.predict import classify

    try:
        result, _ = classify(cls_model, cls_cfg, study, roi, heatmap=False)
    except StudyError as e:  # e.g. a sequence the classifier needs is missing
        logger.info(f"no classification score: {e}")
        return scores
    p = np.sort(np.array([r["score"] for r in result["prediction"]]))[::-1]
    scores["cls_entropy"] = float(-(p * np.log(np.clip(p, 1e-12, 1))).sum())
    scores["cls_margin"] = float(1.0 - (p[0] - p[1])) if len(p) > 1 else 0.0
    scores["cls_mc_std"] = float(result.get("uncertainty", {}).get("malignancy_std", 0.0))
    return scores


class StudyUncertaintyScoring(ScoringMethod):
    def __init__(self, seg_path: str, cls_path: str):
        super().__init__("Uncertainty of segmentation (TTA) and classification (entropy, margin, MC dropout) per unlabeled study")
        self.seg_path, self.cls_path = seg_path, cls_path

    def _models(self):
        ck = load_segmentation(self.seg_path, SEGMENTATION)
        self.seg_spacing = ck.spacing
        cls_model = cls_cfg = None
        if os.path.exists(self.cls_path):
            from parotid.classification.checkpoint import load_checkpoint

            cls_model, cls_cfg = load_checkpoint(self.cls_path)
        return ck, cls_model, cls_cfg

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        images = datastore.get_unlabeled_images(DefaultLabelTag.FINAL)
        if not images or not os.path.exists(self.seg_path):
            return {"scored": 0}
        seg, cls_model, cls_cfg = self._models()
        versions = {"segmentation": os.path.getmtime(self.seg_path),
                    "classify": os.path.getmtime(self.cls_path) if cls_model is not None else None}
        scored = 0
        torch.set_num_threads(1)  # leave a core to the inference server
        for image_id in images:
            info = datastore.get_image_info(image_id) or {}
            if info.get("scored_with") == versions and all(k in info for k in SCORE_KEYS[:2]):
                continue  # already scored with these checkpoints
            try:
                study = read_study(datastore.get_image_uri(image_id), image_id)
                scores = score_study(study, seg.network_for(study.sequences)[1], cls_model, cls_cfg, self.seg_spacing)
            except StudyError as e:
                logger.warning(f"cannot score study {image_id}: {e}")
                continue
            datastore.update_image_info(image_id, {**scores, "scored_with": versions, "scored_ts": int(time.time())})
            scored += 1
        logger.info(f"scored {scored} studies")
        return {"scored": scored}


def uncertainty_strategies() -> Dict[str, Strategy]:
    return {
        "seg_uncertainty": ScoreRanked("seg_tta_variance", "Study whose segmentation is least stable under flips"),
        "seg_tumour_uncertainty": ScoreRanked("seg_tumour_tta_variance",
                                              "Study whose tumour contour is least stable under flips"),
        "cls_entropy": ScoreRanked("cls_entropy", "Study with the highest classification entropy"),
        "cls_margin": ScoreRanked("cls_margin", "Study whose two most likely classes are closest"),
        "cls_mc_dropout": ScoreRanked("cls_mc_std", "Study with the most unstable malignancy probability (MC dropout)"),
    }
