"""External (cross-site) validation: train on some sites, test on another (SYNTHETIC cohorts or imported ones).

A *site* is read per study from ``cohort.csv`` column ``site`` (``parotid-synth --profile``), else
from the final-label info ``site`` (``parotid-import`` with a ``site`` column in labels.csv), else
the cohort folder's name. For each split the same model (Liu two-stage sequence model, early fusion
of ``fusion`` sequences; ``parotid.classification.liu.fit_sequence_model``) is

* trained on every training-site study and applied to the test site (**external**), and
* cross-validated inside the training sites (stratified k-fold, out-of-fold predictions: **internal**),

so the internal and external figures come from the same recipe and the drop is internal − external.

What makes a model travel (issue 14 item 3), each switchable (:class:`Measures`, ``parotid-eval external``
flags) so that an ablation can switch them one by one:

* ``intensity="histogram"``: per-sequence histogram standardisation of each study's crops (MONAI
  ``HistogramNormalize``: the empirical distribution function of the crop voxels, so any monotone change
  of a scanner's intensity scale, gain or contrast curve, gives the same input); default ``"percentile"``
  is the served models' p1 -> 0 / p99 -> 1 scaling (``crops.normalise_stats``: linear gain only);
* ``augment``: training studies get acquisition-like copies (MONAI ``RandGaussianSmooth`` for coarser
  in-plane resolution, ``RandBiasField``, ``RandAdjustContrast``, ``RandScaleIntensity``,
  ``RandGaussianNoise``, drawn per study and sequence), on top of the trainer's flip and gain;
* ``physical_spacing``: every study is resampled to the training studies' median spacing before the
  crops are cut (``parotid.model_space``, as the served models run), instead of using its own grid.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

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


def load_pool(folders: list[str], size: int = 48, n_slices: int | None = None,
              spacing=None) -> tuple[CropSet, np.ndarray]:
    """Crops of every labelled study of `folders` (cut at `spacing` when given) and each study's site."""
    sets, sites = [], []
    for f in folders:
        kw = {} if n_slices is None else {"n_slices": n_slices}
        cs = build_cropset(f, size=size, spacing=spacing, **kw)
        s = study_sites(f)
        sets.append(cs)
        sites += [s[i] for i in cs.study_ids]
    return concat(sets), np.array(sites, dtype=object)


def training_spacing_of(folders: list[str], sites_excluded=()) -> list[float]:
    """Median spacing (mm, I J K) of the labelled studies of `folders` whose site is not excluded."""
    from parotid.cohort import load_classification_cohort
    from parotid.model_space import file_spacing, training_spacing

    paths = []
    for f in folders:
        s = study_sites(f)
        paths += [r.image for r in load_classification_cohort(f) if s[r.study_id] not in set(sites_excluded)]
    return training_spacing(file_spacing(p) for p in paths)


@dataclass(frozen=True)
class Measures:
    """The measures that make a model travel, each on or off (module docstring)."""

    intensity: str = "percentile"  # or "histogram"
    augment: bool = False
    physical_spacing: bool = False
    augment_copies: int = 1

    @property
    def name(self) -> str:
        on = [k for k, v in (("histogram", self.intensity == "histogram"), ("augment", self.augment),
                             ("spacing", self.physical_spacing)) if v]
        return "+".join(on) if on else "none"


def _standardise_percentile(x: np.ndarray) -> np.ndarray:
    """(N, S, S) slices of one sequence -> p1 0 / p99 1, clipped like crops.extract_crop."""
    lo, hi = np.percentile(x, (1, 99))
    return np.clip((x - lo) / max(hi - lo, 1e-3 * max(abs(hi), 1.0)), -2.0, 4.0)


def histogram_standardise(cs: CropSet) -> CropSet:
    """Per study and sequence: MONAI HistogramNormalize over the study's crop slices (values -> their
    empirical distribution function, 0..1); missing sequences stay zero. A new CropSet (slices only)."""
    from monai.transforms import HistogramNormalize

    hn = HistogramNormalize(num_bins=256, min=0, max=1)
    slices = cs.slices.astype(np.float32)
    for i in range(len(cs)):
        for c in np.nonzero(cs.avail[i])[0]:
            slices[i, :, c] = np.asarray(hn(slices[i, :, c]))
    return _with_slices(cs, slices)


def _with_slices(cs: CropSet, slices: np.ndarray) -> CropSet:
    out = cs.subset(np.arange(len(cs)))
    out.slices = slices.astype(np.float16)
    return out


def acquisition_transform(seed: int):
    """Random acquisition change of one sequence's (N, S, S) crop slices (MONAI; N as channels, so every
    slice gets the same bias field, contrast curve and blur): probabilities and ranges chosen to span the
    parotid-synth profiles (noise x0.9-2.2, contrast gamma 0.9-1.15, 0.9-2.2 mm pixels, bias x0.6-1.8)."""
    from monai.transforms import (Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                                  RandScaleIntensity)

    t = Compose([RandGaussianSmooth(sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2), prob=0.5),  # coarser resolution
                 RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=0.5),
                 RandAdjustContrast(gamma=(0.75, 1.35), prob=0.5),
                 RandScaleIntensity(factors=0.25, prob=0.5),
                 RandGaussianNoise(mean=0.0, std=0.1, prob=0.5)])
    t.set_random_state(seed)
    return t


def acquisition_augment(cs: CropSet, idx, seed: int, copies: int = 1) -> CropSet:
    """`copies` acquisition-augmented copies of the studies `idx` (one draw per study and sequence),
    re-standardised per sequence (p1/p99) as a new acquisition would be."""
    t = acquisition_transform(seed)
    sub = cs.subset(np.concatenate([np.asarray(idx)] * copies))
    slices = sub.slices.astype(np.float32)
    for i in range(len(sub)):
        for c in np.nonzero(sub.avail[i])[0]:
            slices[i, :, c] = _standardise_percentile(np.asarray(t(slices[i, :, c]), np.float32))
    return _with_slices(sub, slices)


def _fit_predict(cs, train_idx, test_idx, label_set, groups, epochs1, epochs2, seed,
                 measures: Measures = Measures()) -> np.ndarray:
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    if measures.augment:
        aug = acquisition_augment(cs, train_idx, seed + 1000, measures.augment_copies)
        if measures.intensity == "histogram":
            aug = histogram_standardise(aug)
        n = len(cs)
        cs, train_idx = concat([cs, aug]), np.r_[train_idx, n + np.arange(len(aug))]
    model, _ = fit_sequence_model(cs, train_idx, label_set, groups, "spl", epochs1, epochs2, seed, nets={})
    return torch.softmax(predict_logits(model, cs, test_idx, groups), 1).numpy()


def run_split(cs: CropSet, label_set, train_idx, test_idx, fusion: list[str], folds: int = 5, epochs1: int = 8,
              epochs2: int = 40, seed: int = 0, measures: Measures = Measures()) -> dict:
    """{"internal": (idx, prob) out-of-fold inside the training studies (None with `folds` 0),
    "external": (idx, prob) on the test studies}. `cs` is already standardised as `measures` say."""
    y = cs.labels(label_set)
    groups = [list(fusion)]
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    ext = _fit_predict(cs, train_idx, test_idx, label_set, groups, epochs1, epochs2, seed, measures)
    if folds == 0:
        return {"internal": None, "external": (test_idx, ext)}
    k = int(min(folds, np.bincount(y[train_idx]).max()))
    internal = np.full((len(train_idx), len(label_set.classes)), np.nan)
    skf = StratifiedKFold(n_splits=max(k, 2), shuffle=True, random_state=seed)
    for f, (a, b) in enumerate(skf.split(np.zeros(len(train_idx)), y[train_idx])):
        internal[b] = _fit_predict(cs, train_idx[a], train_idx[b], label_set, groups, epochs1, epochs2, seed + f + 1,
                                   measures)
    return {"internal": (train_idx, internal), "external": (test_idx, ext)}
