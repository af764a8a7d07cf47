"""Label maps sent to / received from the server (0 background, 1 parotid gland, 2 tumour)."""

from __future__ import annotations

import numpy as np

from .geometry import image_from_array

SEGMENTATION_LABELS = {"background": 0, "parotid_gland": 1, "tumor": 2}
SEGMENT_NAMES = {1: "parotid_gland", 2: "tumor"}
SEGMENT_COLORS = {1: (0.90, 0.75, 0.45), 2: (0.85, 0.15, 0.15)}  # for Segment Editor display


def write_label_map(array_kji, ijk_to_ras, path: str) -> str:
    """Write a uint8 label map (Slicer ``[k, j, i]`` array on the reference grid) as NIfTI."""
    import SimpleITK as sitk

    arr = np.asarray(array_kji)
    bad = sorted(set(np.unique(arr).tolist()) - set(SEGMENTATION_LABELS.values()))
    if bad:
        raise ValueError(f"label map holds values {bad}; allowed: 0 background, 1 parotid gland, 2 tumour")
    img = image_from_array(arr.astype(np.uint8), ijk_to_ras)
    sitk.WriteImage(img, path, useCompression=True)
    return path


def roi_from_label(array_kji, value: int = SEGMENTATION_LABELS["tumor"]):
    """Tight half-open box ``[i0, i1, j0, j1, k0, k1]`` around the voxels == `value`, or None.

    The server's boxes come from ``parotid.study.roi_from_mask`` (MONAI); this Slicer-free library runs in
    Slicer's Python without MONAI or the parotid package, hence numpy on Slicer's ``[k, j, i]`` array."""
    k, j, i = np.nonzero(np.asarray(array_kji) == value)
    if len(i) == 0:
        return None
    return [int(i.min()), int(i.max()) + 1, int(j.min()), int(j.max()) + 1, int(k.min()), int(k.max()) + 1]
