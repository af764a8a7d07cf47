"""A small SYNTHETIC parotid case, generated on the spot: sample data for trying the module and for
its in-Slicer test without network or server (registered with Slicer's SampleData module from local
files by ParotidTumor.py). Not a real patient; not anatomy-accurate: an ellipsoid "gland" with a
spherical "tumour", a contrast per sequence, fixed-seed noise.
"""

from __future__ import annotations

import os

import numpy as np

from .geometry import image_from_array

CASE = "ParotidSynthetic"
SHAPE_KJI = (20, 48, 56)
IJK_TO_RAS = np.array([[-0.8, 0, 0, 22.0], [0, -0.8, 0, 19.0], [0, 0, 3.0, -30.0], [0, 0, 0, 1]])  # LPS-stored
CONTRAST = {"CET1": (300.0, 180.0, 520.0), "T2": (200.0, 420.0, 650.0), "ADC": (2500.0, 1100.0, 1500.0)}


def case(seed: int = 7):
    """``({key: array [k, j, i] float32}, label uint8 (1 gland, 2 tumour), IJK->RAS)``."""
    k, j, i = np.indices(SHAPE_KJI, dtype=float)
    gland = ((i - 26) / 18) ** 2 + ((j - 24) / 14) ** 2 + ((k - 10) / 7) ** 2 <= 1
    tumor = ((i - 30) ** 2 + (j - 22) ** 2) / 36 + ((k - 10) / 2.2) ** 2 <= 1
    label = np.zeros(SHAPE_KJI, np.uint8)
    label[gland] = 1
    label[tumor] = 2
    rng = np.random.default_rng(seed)
    vols = {}
    for key, (bg, gl, tu) in CONTRAST.items():
        a = np.choose(label, [bg, gl, tu]).astype(np.float32)
        vols[key] = (a + rng.normal(0, 0.05 * bg, SHAPE_KJI)).astype(np.float32)
    return vols, label, IJK_TO_RAS.copy()


def write_case(folder: str) -> dict:
    """Write ``<CASE> <key>.nii.gz`` per sequence and ``<CASE> label.nii.gz`` (once); returns
    ``{key or "label": path}``."""
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    vols, label, m = case()
    paths = {key: os.path.join(folder, f"{CASE} {key}.nii.gz") for key in list(vols) + ["label"]}
    for key, path in paths.items():
        if not os.path.exists(path):
            arr = label if key == "label" else vols[key]
            sitk.WriteImage(image_from_array(arr, m), path + ".part.nii.gz", useCompression=True)
            os.replace(path + ".part.nii.gz", path)
    return paths
