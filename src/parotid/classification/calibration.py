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


def trained_study_ids(cfg: dict) -> set[str]:
    """Study ids a checkpoint's config records as trained on or used for early stopping (empty for
    checkpoints from before ``cfg["split"]``: then only the training cohort's name is known)."""
    split = cfg.get("split") or {}
    return {str(s) for role in ("stage1", "stage2", "early_stopping") for s in split.get(role, [])}


def _cohort_seeds(cohort: str) -> list[int]:
    """Generator seeds in the cohort's ``cohort.csv`` (parotid-synth writes a ``seed`` column); [] if none."""
    import csv
    import os

    path = os.path.join(cohort, "cohort.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return sorted({int(r["seed"]) for r in csv.DictReader(f) if (r.get("seed") or "").isdigit()})


def refit_checkpoint(path: str, cohort: str, out: str, seed: int = 0, note: str = "") -> dict:
    """Refit the temperature and the undetermined threshold of the checkpoint `path` on the labelled
    `cohort` folder (patients the model never saw) and write the result to `out`. Weights and the input
    check block are copied as stored (bit-identical); only ``temperature``, ``uncertainty``,
    ``calibration`` (with ``cohort``, ``note`` and ``date``) and ``split["calibration"]`` change."""
    import os
    import time

    from parotid.labels import get_label_set

    from .checkpoint import CONFIG, load_checkpoint, read_raw, write_config
    from .data import build_cropset

    raw = read_raw(path)
    model, cfg = load_checkpoint(path)
    ls = get_label_set(cfg["label_set"])
    cs = build_cropset(cohort, size=cfg["size"], n_slices=cfg["n_slices"])  # as the trainer and parotid-eval holdout
    name = os.path.basename(os.path.abspath(cohort))
    if name == (cfg.get("trained") or {}).get("cohort"):
        raise ValueError(f"{cohort} is the cohort the checkpoint was trained on")
    seen = trained_study_ids(cfg) & {str(s) for s in cs.study_ids}
    if seen:
        raise ValueError(f"{len(seen)} studies of {cohort} were trained on: {sorted(seen)[:5]}")
    required = cs.channels(cfg.get("required", []))
    idx = [i for i, t in enumerate(cs.tumor_class) if ls.accepts(t) and all(cs.avail[i, required])]
    cal = calibrate(model, cfg["groups"], cs, idx, ls, "refit on unseen cohort", seed=seed)
    rec = cal["calibration"]
    ids = rec.pop("study_ids")
    rec.update(cohort=name, cohort_seeds=_cohort_seeds(cohort), mc_dropout_seed=seed, refit=True, note=note, previous_temperature=cfg.get("temperature"),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    new = dict(raw[CONFIG])  # as stored (fusion keys not normalised)
    new.update(temperature=cal["temperature"], uncertainty=cal["uncertainty"], calibration=rec)
    new["split"] = {**(new.get("split") or {}), "calibration": ids}
    write_config(path, new, out)
    return new


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m parotid.classification.calibration",
                                 description="Refit a classifier checkpoint's temperature and undetermined threshold "
                                             "on a labelled cohort it never saw (weights kept bit-identical).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refit")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--cohort", required=True, help="labelled cohort folder excluded from every training stage")
    r.add_argument("--out", help="output checkpoint (default: overwrite --checkpoint); <out>.json sidecar written too")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--note", default="")
    r.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = a.out or a.checkpoint
    cfg = refit_checkpoint(a.checkpoint, a.cohort, out, a.seed, a.note)
    with open(out[:-3] + ".json" if out.endswith(".pt") else out + ".json", "w") as f:
        json.dump(cfg, f, indent=1)
    c = cfg["calibration"]
    print(f"{out}: T {c['previous_temperature']} -> {cfg['temperature']:.3f} on {c['n']} patients of {c['cohort']} "
          f"(ECE {c.get('ece_before', float('nan')):.3f} -> {c.get('ece_after', float('nan')):.3f}); "
          f"undetermined below top prob {cfg['uncertainty']['max_top_prob_below']}")


if __name__ == "__main__":
    main()
