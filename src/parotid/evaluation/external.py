"""External (cross-site) validation: train on some sites, test on another (SYNTHETIC cohorts or imported ones).

A *site* is read per study from ``cohort.csv`` column ``site`` (``parotid-synth --profile``), else
from the final-label info ``site`` (``parotid-import`` with a ``site`` column in labels.csv), else
the cohort folder's name. For each split the same model (Liu two-stage sequence model, early fusion
of ``fusion`` sequences; ``parotid.classification.liu.fit_sequence_model``) is

* trained on every training-site study and applied to the test site (**external**), and
* cross-validated inside the training sites (stratified k-fold, out-of-fold predictions: **internal**),

so the internal and external figures come from the same recipe and the drop is internal − external.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from parotid.classification.data import CropSet, build_cropset
from parotid.classification.liu import fit_sequence_model, predict_logits


def study_sites(folder: str) -> dict[str, str]:
    """study_id -> site (cohort.csv ``site``, else final-label info ``site``, else the folder's name)."""
    default = os.path.basename(os.path.abspath(folder).rstrip("/"))
    sites: dict[str, str] = {}
    ds_path = os.path.join(folder, "datastore_v2.json")
    if os.path.exists(ds_path):
        with open(ds_path) as f:
            for sid, obj in (json.load(f).get("objects") or {}).items():
                info = (((obj.get("labels") or {}).get("final") or {}).get("info") or {})
                if str(info.get("site", "")).strip():
                    sites[sid] = str(info["site"]).strip()
    csv_path = os.path.join(folder, "cohort.csv")
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                if str(row.get("site", "")).strip():
                    sites[row["study_id"]] = row["site"].strip()
    return _Default(sites, default)


class _Default(dict):
    def __init__(self, d, default):
        super().__init__(d)
        self.default = default

    def __missing__(self, key):
        return self.default


def concat(sets: list[CropSet]) -> CropSet:
    """One CropSet from several (same crop size / slices / sequences)."""
    if len(sets) == 1:
        return sets[0]
    cat = lambda k: np.concatenate([getattr(s, k) for s in sets])  # noqa: E731
    return CropSet(sum((s.study_ids for s in sets), []), sum((s.tumor_class for s in sets), []), sets[0].sequences,
                   cat("slices"), cat("gland"), cat("free"), cat("free_gland"), cat("free_valid"), cat("box"),
                   cat("clinical"), cat("avail"), None if any(s.ks is None for s in sets) else cat("ks"))


def load_pool(folders: list[str], size: int = 48, n_slices: int | None = None) -> tuple[CropSet, np.ndarray]:
    """Crops of every labelled study of `folders` and each study's site."""
    sets, sites = [], []
    for f in folders:
        kw = {} if n_slices is None else {"n_slices": n_slices}
        cs = build_cropset(f, size=size, **kw)
        s = study_sites(f)
        sets.append(cs)
        sites += [s[i] for i in cs.study_ids]
    return concat(sets), np.array(sites, dtype=object)


def _fit_predict(cs, train_idx, test_idx, label_set, groups, epochs1, epochs2, seed) -> np.ndarray:
    model, _ = fit_sequence_model(cs, train_idx, label_set, groups, "spl", epochs1, epochs2, seed, nets={})
    return torch.softmax(predict_logits(model, cs, np.asarray(test_idx), groups), 1).numpy()


def run_split(cs: CropSet, label_set, train_idx, test_idx, fusion: list[str], folds: int = 5, epochs1: int = 8,
              epochs2: int = 40, seed: int = 0) -> dict:
    """{"internal": (idx, prob) out-of-fold inside the training studies, "external": (idx, prob) on the test studies}."""
    y = cs.labels(label_set)
    groups = [list(fusion)]
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    ext = _fit_predict(cs, train_idx, test_idx, label_set, groups, epochs1, epochs2, seed)
    k = int(min(folds, np.bincount(y[train_idx]).max()))
    internal = np.full((len(train_idx), len(label_set.classes)), np.nan)
    skf = StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    for f, (a, b) in enumerate(skf.split(np.zeros(len(train_idx)), y[train_idx])):
        internal[b] = _fit_predict(cs, train_idx[a], train_idx[b], label_set, groups, epochs1, epochs2, seed + f + 1)
    return {"internal": (train_idx, internal), "external": (test_idx, ext)}
