"""Cohort reading and the crop cache used by training and evaluation.

A cohort folder is what ``parotid-synth`` writes (docs/dev/CONTRACT.md): study files, ``labels/final``,
``datastore_v2.json`` (final-label info ``tumor_class`` and ``roi``) and ``cohort.csv`` (clinical
variables); ``parotid.cohort`` reads it. Reading a study file is the slow part, so every study is cut once into the crops of
``crops.extract_crop`` (all sequences of the study, fixed size) and cached in
``$TMPDIR/parotid-crops/<hash of the folder>/`` (or ``$PAROTID_CROP_CACHE`` / ``cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from parotid.cohort import CohortItem, load_classification_cohort
from parotid.sequences import SEQUENCE_KEYS
from parotid.study import read_label_map, read_study

from .crops import DEFAULT_MARGIN, DEFAULT_SIZE, DEFAULT_SLICES, extract_crop


def _clinical_vector(row: dict) -> list[float]:
    """age/100, sex (1 = male), smoker (1 = yes); unknown -> 0."""
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return 0.0
    age = num(row.get("age")) / 100.0
    sex = str(row.get("sex", "")).strip().lower()
    sex_v = 1.0 if sex in ("m", "male", "1") else 0.0
    sm = str(row.get("smoker", "")).strip().lower()
    sm_v = 1.0 if sm in ("1", "true", "yes", "y", "smoker", "current", "former") else 0.0
    return [age, sex_v, sm_v]


@dataclass
class CropSet:
    """All crops of a cohort, with every sequence key as a channel (zeros + avail=False if absent)."""

    study_ids: list[str]
    tumor_class: list[str]
    sequences: tuple[str, ...]
    slices: np.ndarray  # (n, N, C, S, S) float16
    gland: np.ndarray  # (n, N, 1, S, S) uint8
    free: np.ndarray  # (n, M, C, S, S) float16
    free_gland: np.ndarray  # (n, M, 1, S, S) uint8
    free_valid: np.ndarray  # (n, M) bool
    box: np.ndarray  # (n, 4) float32
    clinical: np.ndarray  # (n, 3) float32
    avail: np.ndarray  # (n, C) bool
    ks: np.ndarray | None = None  # (n, N) int: slice index (k) of each crop; repeats when a tumour is thin

    def channels(self, seqs) -> list[int]:
        return [self.sequences.index(s) for s in seqs]

    def subset(self, idx) -> "CropSet":
        idx = np.asarray(idx)
        return CropSet([self.study_ids[i] for i in idx], [self.tumor_class[i] for i in idx], self.sequences,
                       self.slices[idx], self.gland[idx], self.free[idx], self.free_gland[idx],
                       self.free_valid[idx], self.box[idx], self.clinical[idx], self.avail[idx],
                       None if self.ks is None else self.ks[idx])

    def labels(self, label_set) -> np.ndarray:
        return np.array([label_set.index(c) for c in self.tumor_class])

    def __len__(self):
        return len(self.study_ids)


def build_cropset(folder: str, size: int = DEFAULT_SIZE, n_slices: int = DEFAULT_SLICES, n_free: int = 4,
                  margin: float = DEFAULT_MARGIN, cache_dir: str | None = None, limit: int | None = None,
                  spacing=None) -> CropSet:
    """Crops of every labelled study of `folder`; `spacing` (mm, I J K): cut after resampling each study to
    it (parotid.model_space, as the served models do) instead of on the study's own grid."""
    recs = load_classification_cohort(folder)
    if limit:
        recs = recs[:limit]
    if not recs:
        raise SystemExit(f"no labelled studies (tumor_class + roi) in {folder}")
    if cache_dir is None:  # outside the cohort folder (a served studies folder must stay clean)
        import tempfile
        tag = hashlib.md5(os.path.abspath(folder).encode()).hexdigest()[:8]
        cache_dir = os.environ.get("PAROTID_CROP_CACHE") or os.path.join(tempfile.gettempdir(), "parotid-crops", tag)
    return cropset_from_records(recs, size, n_slices, n_free, margin, cache_dir,
                                name=os.path.basename(folder.rstrip("/")), spacing=spacing)


def cropset_from_records(recs: list[CohortItem], size: int = DEFAULT_SIZE, n_slices: int = DEFAULT_SLICES, n_free: int = 4,
                         margin: float = DEFAULT_MARGIN, cache_dir: str | None = None, name: str = "cohort",
                         spacing=None) -> CropSet:
    """Crops of the given studies; cached in `cache_dir` (keyed by ids, boxes, classes and file mtimes, and
    `spacing` when given: studies resampled to it first, boxes and labels mapped with them)."""
    rows = [[r.study_id, r.roi, r.tumor_class, os.path.getmtime(r.image), os.path.getmtime(r.label) if r.label else 0]
            for r in recs]
    key = hashlib.md5(json.dumps(rows if spacing is None else [rows, [float(v) for v in spacing]]).encode()).hexdigest()[:10]
    cache = os.path.join(cache_dir, f"crops_s{size}_n{n_slices}_f{n_free}_m{margin}_{key}_k.npz") if cache_dir else None
    if cache and os.path.exists(cache):
        z = np.load(cache, allow_pickle=False)
        return CropSet(list(z["study_ids"]), list(z["tumor_class"]), tuple(z["sequences"]), z["slices"], z["gland"],
                       z["free"], z["free_gland"], z["free_valid"], z["box"], z["clinical"], z["avail"], z["ks"])
    seqs = SEQUENCE_KEYS
    C, n = len(seqs), len(recs)
    slices = np.zeros((n, n_slices, C, size, size), np.float16)
    gland = np.zeros((n, n_slices, 1, size, size), np.uint8)
    free = np.zeros((n, n_free, C, size, size), np.float16)
    free_gland = np.zeros((n, n_free, 1, size, size), np.uint8)
    free_valid = np.zeros((n, n_free), bool)
    box = np.zeros((n, 4), np.float32)
    avail = np.zeros((n, C), bool)
    ks = np.zeros((n, n_slices), np.int32)
    for i, r in enumerate(tqdm(recs, desc=f"crops {name}", mininterval=5)):
        st = read_study(r.image, r.study_id)
        lab = read_label_map(r.label) if r.label else None
        roi = r.roi
        if spacing is not None:
            from parotid.model_space import label_to_model, to_model_space

            space = to_model_space(st, spacing)
            st, roi = space.model_study, space.roi_to_model(r.roi)
            lab = None if lab is None else label_to_model(lab, space)
        c = extract_crop(st.array(), roi, size, n_slices, margin, label=lab, n_free=n_free)
        ch = [seqs.index(s) for s in st.sequences]
        slices[i][:, ch] = c.slices
        avail[i, ch] = True
        box[i] = c.box
        ks[i] = c.ks
        if c.gland is not None:
            gland[i] = c.gland > 0.5
        if c.free is not None and len(c.free):
            m = len(c.free)
            free[i, :m][:, ch] = c.free
            free_gland[i, :m] = c.free_gland > 0.5
            free_valid[i, :m] = True
    cs = CropSet([r.study_id for r in recs], [r.tumor_class for r in recs], tuple(seqs), slices, gland, free,
                 free_gland, free_valid, box, np.array([_clinical_vector(r.clinical) for r in recs], np.float32), avail, ks)
    if not cache:
        return cs
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".part.npz"
    np.savez(tmp, study_ids=np.array(cs.study_ids), tumor_class=np.array(cs.tumor_class), sequences=np.array(seqs),
             slices=slices, gland=gland, free=free, free_gland=free_gland, free_valid=free_valid, box=box,
             clinical=cs.clinical, avail=avail, ks=ks)
    os.replace(tmp, cache)
    return cs
