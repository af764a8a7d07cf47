"""Calibration of a trained sequence model on patients excluded from every training stage.

* temperature scaling (Guo et al. 2017, ``models.fit_temperature``) on the calibration patients' logits;
* the MC-dropout ``undetermined`` threshold on the mean top-class probability: the lowest value of a
  coarse grid whose determined calibration patients reach ``target_accuracy`` with at least
  ``min_coverage`` of them determined (else the default is kept, and the record says so). The
  malignancy-std threshold stays at its default (too few patients to fit two thresholds);
* ECE (top label, 10 bins) and NLL before/after the temperature on the same patients, recorded.

Below ``MIN_CALIBRATION`` patients nothing is fitted (T = 1, default thresholds) and the record says why.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models import SequenceModel, fit_temperature

MIN_CALIBRATION = 8
DEFAULT_UNCERTAINTY = {"method": "mc_dropout", "passes": 20, "max_top_prob_below": 0.6, "max_std_above": 0.15}
TOP_PROB_GRID = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))


@torch.no_grad()
def mc_dropout_probs(model: SequenceModel, feats: torch.Tensor, temperature: float, passes: int,
                     seed: int = 0) -> np.ndarray:
    """(passes, n, classes) probabilities with the sequence head's dropout active (as predict.mc_dropout)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.encoder.train()
        model.head.train()
        out = [torch.softmax(model.forward_features(feats) / temperature, 1) for _ in range(passes)]
        model.eval()
    return torch.stack(out).numpy()


def fit_top_prob_threshold(mc_top: np.ndarray, correct: np.ndarray, determined_by_std: np.ndarray,
                           target_accuracy: float = 0.9, min_coverage: float = 0.5,
                           default: float = DEFAULT_UNCERTAINTY["max_top_prob_below"]) -> dict:
    """Lowest grid threshold t such that patients with mean top probability >= t (and std within
    its threshold) are >= `target_accuracy` correct and >= `min_coverage` of all; else `default`."""
    n = len(mc_top)
    for t in TOP_PROB_GRID:
        det = (mc_top >= t) & determined_by_std
        if det.mean() >= min_coverage and det.any() and correct[det].mean() >= target_accuracy:
            return {"max_top_prob_below": float(t), "fitted": True, "coverage": float(det.mean()),
                    "accuracy_determined": float(correct[det].mean()), "n": n}
    det = (mc_top >= default) & determined_by_std
    return {"max_top_prob_below": float(default), "fitted": False, "n": n,
            "reason": f"no threshold reaches accuracy {target_accuracy} at coverage >= {min_coverage}; default kept",
            "coverage": float(det.mean()), "accuracy_determined": float(correct[det].mean()) if det.any() else None}


def calibrate(model: SequenceModel, groups: list[list[str]], cs, idx, label_set, source: str,
              target_accuracy: float = 0.9, seed: int = 0) -> dict:
    """Temperature + undetermined threshold fitted on the studies `idx` of `cs` (never trained on)."""
    from parotid.evaluation.metrics import expected_calibration_error

    from .liu import predict_logits

    idx = np.asarray(idx, int)
    rec = {"source": source, "n": int(len(idx)), "study_ids": [str(cs.study_ids[i]) for i in idx]}
    unc = dict(DEFAULT_UNCERTAINTY)
    if len(idx) < MIN_CALIBRATION:
        rec.update(temperature=1.0, fitted=False,
                   reason=f"only {len(idx)} calibration patients (< {MIN_CALIBRATION}): T = 1 and default thresholds")
        return {"temperature": 1.0, "uncertainty": unc, "calibration": rec}
    y = cs.labels(label_set)[idx]
    logits = predict_logits(model, cs, idx, groups)
    T = fit_temperature(logits, torch.from_numpy(y))
    yt = torch.from_numpy(y)
    p0, p1 = torch.softmax(logits, 1).numpy(), torch.softmax(logits / T, 1).numpy()
    chans = cs.channels([q for g in groups for q in g])
    with torch.no_grad():
        feats = model.slice_features(torch.from_numpy(cs.slices[idx][:, :, chans].astype(np.float32)),
                                     torch.from_numpy(cs.box[idx]))
    mc = mc_dropout_probs(model, feats, T, unc["passes"], seed)
    mean = mc.mean(0)
    mal = list(label_set.malignant_indices)
    std = mc[:, :, mal].sum(2).std(0) if mal else np.zeros(len(idx))
    thr = fit_top_prob_threshold(mean.max(1), mean.argmax(1) == y, std <= unc["max_std_above"], target_accuracy)
    unc["max_top_prob_below"] = thr["max_top_prob_below"]
    unc["fitted_on"] = f"{source}: {len(idx)} patients excluded from training"
    unc["target_accuracy_determined"] = target_accuracy
    rec.update(temperature=T, fitted=True,
               ece_before=expected_calibration_error(y, p0), ece_after=expected_calibration_error(y, p1),
               nll_before=float(F.cross_entropy(logits, yt)), nll_after=float(F.cross_entropy(logits / T, yt)),
               accuracy=float((p1.argmax(1) == y).mean()), undetermined_threshold=thr)
    return {"temperature": T, "uncertainty": unc, "calibration": rec}
