"""Tiny hand-made studies for unit tests (NOT the synthetic cohort generator; a test helper, not shipped).

Each toy study is a small ellipsoid 'gland' with a spherical 'tumour' whose per-sequence contrast
depends on its class, written in the contract's cohort layout (study files, labels/final,
datastore_v2.json with tumor_class/roi, cohort.csv).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import SimpleITK as sitk

from parotid.labels import TUMOR
from parotid.study import roi_from_mask, study_from_array, write_study

TOY_SEQS = ("T2", "CET1", "ADC")
# class -> tumour intensity per sequence (gland is 1.0 everywhere)
_CONTRAST = {
    "pleomorphic_adenoma": (2.0, 1.6, 1.8),
    "warthin": (0.6, 1.2, 0.6),
    "basal_cell_adenoma": (1.4, 2.0, 1.2),
    "malignant": (0.9, 1.5, 0.4),
}


def toy_study(tumor_class: str, shape=(48, 48, 16), seed: int = 0, spacing=(1.0, 1.0, 3.0)):
    rng = np.random.default_rng(seed)
    I, J, K = shape
    ii, jj, kk = np.meshgrid(np.arange(I), np.arange(J), np.arange(K), indexing="ij")
    gc = np.array([I / 2, J / 2, K / 2]) + rng.uniform(-2, 2, 3)
    gland = ((ii - gc[0]) / (I * 0.35)) ** 2 + ((jj - gc[1]) / (J * 0.3)) ** 2 + ((kk - gc[2]) / (K * 0.4)) ** 2 < 1
    r = rng.uniform(4, 7)
    tc = gc + np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-1, 1)])
    tumor = ((ii - tc[0]) / r) ** 2 + ((jj - tc[1]) / r) ** 2 + ((kk - tc[2]) / (r / 3)) ** 2 < 1
    tumor &= gland
    label = np.zeros(shape, np.uint8)
    label[gland] = 1
    label[tumor] = 2
    arr = np.zeros((len(TOY_SEQS),) + shape, np.float32)
    gain = rng.uniform(200, 800, len(TOY_SEQS))
    for c, g in enumerate(gain):
        vol = np.full(shape, 0.3, np.float32)
        vol[gland] = 1.0
        vol[tumor] = _CONTRAST[tumor_class][c]
        vol += rng.normal(0, 0.08, shape).astype(np.float32)
        arr[c] = vol * g
    ref = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    roi = roi_from_mask(label == TUMOR)
    return study_from_array(arr, TOY_SEQS, ref), label, roi


def write_toy_cohort(folder: str, n: int = 16, seed: int = 0, classes=tuple(_CONTRAST)) -> list[str]:
    os.makedirs(os.path.join(folder, "labels", "final"), exist_ok=True)
    rng = np.random.default_rng(seed)
    objects, rows, ids = {}, [], []
    for i in range(n):
        cls = classes[i % len(classes)]
        sid = f"toy{seed:03d}_{i:03d}"
        study, label, roi = toy_study(cls, seed=seed * 1000 + i)
        write_study(study, os.path.join(folder, sid + ".nii.gz"))
        lab = sitk.GetImageFromArray(np.ascontiguousarray(label.T))
        lab.CopyInformation(study.reference)
        sitk.WriteImage(lab, os.path.join(folder, "labels", "final", sid + ".nii.gz"))
        objects[sid] = {"image": {"ext": ".nii.gz", "info": {}},
                        "labels": {"final": {"ext": ".nii.gz", "info": {"tumor_class": cls, "roi": roi, "synthetic": True}}}}
        rows.append({"study_id": sid, "tumor_class": cls, "age": int(rng.integers(20, 90)),
                     "sex": "M" if rng.random() < 0.5 else "F", "smoker": int(rng.random() < 0.3)})
        ids.append(sid)
    with open(os.path.join(folder, "datastore_v2.json"), "w") as f:
        json.dump({"name": "toy", "description": "toy studies (synthetic)", "images_dir": "", "labels_dir": "labels",
                   "objects": objects}, f)
    with open(os.path.join(folder, "cohort.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return ids
