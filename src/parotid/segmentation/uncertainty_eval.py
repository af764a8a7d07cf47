"""Does the segmentation's active-learning score point at the studies the model segments worst?
(SYNTHETIC held-out cohorts.)

    python -m parotid.segmentation.uncertainty_eval --cohort /tmp/h521 /tmp/h522 --checkpoints old.pt new.pt \
        --out res.json

For every complete study, each checkpoint computes the scores the server stores for active learning
(``seg_tta_variance`` and ``seg_tumour_tta_variance``: `segment_with_uncertainty`, 4 in-plane flips, at
the checkpoint's spacing, the same call as `lib.activelearning.uncertainty.score_study`) and the Dice of
that same label map against the reference label brought to the model grid (`label_to_model`).
Reported per checkpoint and score:
- Spearman's rho between the score and the tumour / gland Dice error (1 - Dice); higher is better;
- ROC-AUC of the score for telling studies with tumour Dice < `--poor` from the others;
- how many of the `--top` highest-scored studies are among the `--top` worst by tumour Dice
  (what an annotator asking `/activelearning/seg_uncertainty` or `seg_tumour_uncertainty` for that many
  studies gets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from parotid.cohort import load_cohort
from parotid.labels import GLAND, TUMOR
from parotid.model_space import label_to_model, to_model_space
from parotid.segmentation.inference import dice, mirror_flips, segment_with_uncertainty, study_input
from parotid.segmentation.subset_eval import load_checkpoint
from parotid.study import read_label_map, read_study


def score_cohorts(cohorts: list[str], checkpoints: list[str], limit: int | None = None) -> dict:
    """Per checkpoint and complete study: the active-learning score and the Dice of the same label map."""
    models = {p: load_checkpoint(p) for p in checkpoints}
    rows: dict[str, list[dict]] = {p: [] for p in checkpoints}
    items = [it for cohort in cohorts for it in load_cohort(cohort)]
    spec0 = next(iter(models.values()))[1]
    for it in items:
        if limit is not None and len(rows[checkpoints[0]]) >= limit:
            break
        study = read_study(it.image, it.study_id)
        if not all(s in study.sequences for s in spec0.sequences):
            continue
        reference = read_label_map(it.label)
        for path, (ck, spec) in models.items():
            space = to_model_space(study, ck.spacing)
            truth = label_to_model(reference, space)
            label, flips = segment_with_uncertainty(ck.network_for(study.sequences)[1], spec,
                                                    study_input(space.model_study, spec), mirror_flips(space.model_study))
            rows[path].append({"study": it.study_id, "seg_tta_variance": flips.foreground,
                               "seg_tumour_tta_variance": flips.tumour,
                               "dice_tumor": dice(label == TUMOR, truth == TUMOR),
                               "dice_gland": dice(label == GLAND, truth == GLAND)})
    return rows


SCORES = ("seg_tta_variance", "seg_tumour_tta_variance")


def ranking_summary(rows: list[dict], key: str, poor: float = 0.8, top: int = 10) -> dict:
    score = np.array([r[key] for r in rows])
    tumour_error = 1 - np.array([r["dice_tumor"] for r in rows])
    gland_error = 1 - np.array([r["dice_gland"] for r in rows])
    is_poor = tumour_error > 1 - poor
    k = min(top, len(rows))
    worst = set(np.argsort(-tumour_error, kind="stable")[:k])
    picked = set(np.argsort(-score, kind="stable")[:k])
    return {
        "n": len(rows),
        "spearman_tumour_error": float(spearmanr(score, tumour_error).statistic),
        "spearman_gland_error": float(spearmanr(score, gland_error).statistic),
        "n_poor": int(is_poor.sum()),
        "auc_poor": float(roc_auc_score(is_poor, score)) if 0 < is_poor.sum() < len(rows) else None,
        f"top{k}_among_worst{k}": len(worst & picked),
        "score_median": float(np.median(score)),
        "score_p90": float(np.percentile(score, 90)),
        "mean_dice_tumor": float(1 - tumour_error.mean()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Active-learning segmentation score vs Dice error (SYNTHETIC).")
    ap.add_argument("--cohort", required=True, nargs="+", help="held-out cohort folder(s)")
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--out", help="JSON file for all numbers, per study included")
    ap.add_argument("--poor", type=float, default=0.8, help="tumour Dice below this is a poor segmentation")
    ap.add_argument("--top", type=int, default=10, help="studies an annotator asks for")
    ap.add_argument("--limit", type=int, help="at most this many complete studies")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t = time.time()
    rows = score_cohorts(a.cohort, a.checkpoints, a.limit)
    res = {"synthetic": True, "cohorts": a.cohort, "poor_below": a.poor,
           "summary": {p: {k: ranking_summary(r, k, a.poor, a.top) for k in SCORES} for p, r in rows.items()},
           "per_study": rows, "seconds": round(time.time() - t, 1)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(f"SYNTHETIC held-out cohort(s) {' '.join(a.cohort)}, {res['seconds']} s")
    for path, by_score in res["summary"].items():
        for key, s in by_score.items():
            print(path, key, json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
