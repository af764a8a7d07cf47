"""Scores of a checkpoint FILE on held-out studies, as the server would answer them: the promotion gate
(parotid.registry) scores the candidate and the served checkpoint with these, on the same studies.

Classification: ``parotid.classification.predict.classify`` (the infer task's code: resampling to the
checkpoint's spacing, temperature) on each study's annotated box; macro one-vs-rest AUC over the classes
that have both outcomes among the studies (plain AUC for two classes), log-loss and accuracy of the
calibrated probabilities. Segmentation: the whole-study model's label map (or the box model's contour of
the largest tumour, prompted by its box) against the final label; mean Dice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from parotid.cohort import CohortItem
from parotid.labels import GLAND, TUMOR
from parotid.study import StudyError, read_label_map, read_study, roi_from_mask


def macro_auc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over classes with positives and negatives in `y`; None if there is none."""
    aucs = [roc_auc_score(y == c, prob[:, c]) for c in range(prob.shape[1]) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(aucs)) if aucs else None


def classifier_scores(path: str, items: Sequence[CohortItem]) -> dict:
    from parotid.classification.predict import classify
    from parotid.classification.checkpoint import load_checkpoint
    from parotid.labels import get_label_set

    model, cfg = load_checkpoint(path)
    cfg = {**cfg, "uncertainty": {**cfg.get("uncertainty", {}), "passes": 2}}  # MC dropout does not enter the scores
    ls = get_label_set(cfg["label_set"])
    ys, probs, ids, skipped = [], [], [], {}
    for it in items:
        if not (it.tumor_class and it.roi and ls.accepts(str(it.tumor_class))):
            continue
        try:
            result, _ = classify(model, cfg, read_study(it.image, it.study_id), it.roi, heatmap=False)
        except StudyError as e:  # e.g. a sequence this checkpoint requires is missing
            skipped[it.study_id] = str(e)[:200]
            continue
        ys.append(ls.index(str(it.tumor_class)))
        probs.append([p["score"] for p in result["prediction"]])
        ids.append(it.study_id)
    out: dict = {"n": len(ys), "study_ids": ids, "skipped": skipped, "auc": None, "log_loss": None, "accuracy": None}
    if ys:
        y, p = np.asarray(ys), np.clip(np.asarray(probs, float), 1e-7, 1.0)
        p = p / p.sum(1, keepdims=True)
        out.update(auc=macro_auc(y, p), log_loss=float(log_loss(y, p, labels=list(range(p.shape[1])))),
                   accuracy=float(np.mean(p.argmax(1) == y)))
    return out


def segmentation_scores(path: str, spec, items: Sequence[CohortItem]) -> dict:
    from scipy import ndimage

    from parotid.segmentation.checkpoint import load_segmentation
    from parotid.segmentation.inference import contour_study, dice, segment_study

    ck = load_segmentation(path, spec)
    spacing = ck.spacing
    tumour, gland, ids, skipped = [], [], [], {}
    for it in items:
        if not it.label:
            continue
        try:
            study = read_study(it.image, it.study_id)
            study.require(spec.required)
        except StudyError as e:
            skipped[it.study_id] = str(e)[:200]
            continue
        lab = read_label_map(it.label)
        net = ck.network_for(study.sequences)[1]  # the served choice of weights
        if spec.box_prompted:
            comps, n = ndimage.label(lab == TUMOR)
            if n == 0:
                continue
            truth = comps == 1 + int(np.argmax(ndimage.sum(np.ones_like(comps), comps, range(1, n + 1))))
            pred, _ = contour_study(net, spec, study, roi_from_mask(truth), spacing)
            tumour.append(dice(pred == TUMOR, truth))
        else:
            pred, _ = segment_study(net, spec, study, spacing)
            tumour.append(dice(pred == TUMOR, lab == TUMOR))
            gland.append(dice(pred == GLAND, lab == GLAND))
        ids.append(it.study_id)
    return {"n": len(ids), "study_ids": ids, "skipped": skipped,
            "dice_tumor": float(np.mean(tumour)) if tumour else None,
            "dice_gland": float(np.mean(gland)) if gland else None}
