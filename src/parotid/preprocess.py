"""Intensity normalisation of study channels — one place, shared by segmentation and classification.

Weighted MR sequences have arbitrary units: each is scaled by robust percentiles (p1 -> 0, p99 -> 1,
`percentile_scaling` + `apply_scaling`). Quantitative maps keep their meaning in segmentation: ADC
(1e-6 mm^2/s) is divided by a fixed constant so that "low ADC" stays low across studies.

The two models take their percentiles over different regions and clip differently, and each shipped
checkpoint was trained on its own rule (the subsets tables are tied to the checkpoints' SHA-256), so the
rules are two named parameter sets of one function, not one rule:

- segmentation (`normalize_channels`) sees the whole study: percentiles of the study's foreground
  (voxels > 0, the air outside the head would otherwise pull p1 to 0), ADC on its fixed scale,
  clip [-1, 3];
- classification (`classification.crops`) sees only the crop around the box: percentiles inside the
  crop window (box + margin in-plane, the box's slices), every sequence including ADC (the classifier
  compares tumour with the gland right around it, whatever the rest of the head looks like), a range
  floor relative to p99, clip [-2, 4].

``monai.transforms.ScaleIntensityRangePercentiles`` is not used: it takes the percentiles of the very
array it scales, while both rules here take them from a region (foreground / crop window) and apply them
to a larger array (whole study / zero-padded window), and neither range floor is MONAI's.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

QUANTITATIVE_SCALE = {"ADC": 3000.0}  # ADC 0..3000e-6 mm^2/s -> 0..1
PERCENTILES = (1.0, 99.0)
SEGMENTATION_CLIP = (-1.0, 3.0)
CLASSIFICATION_CLIP = (-2.0, 4.0)
MIN_FOREGROUND = 100  # fewer foreground voxels: the whole channel gives the percentiles


def percentile_scaling(regions: Iterable[np.ndarray], percentiles: Sequence[float] = PERCENTILES,
                       min_range: float = 0.0, relative_min_range: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (lo, scale), float32 (C,): lo = the lower percentile of the channel's region, scale =
    upper - lower percentile, at least max(`min_range`, `relative_min_range` * max(|upper|, 1))."""
    q = np.stack([np.percentile(r, percentiles) for r in regions]).astype(np.float32, copy=False)
    lo, hi = q[:, 0], q[:, 1]
    floor = np.maximum(min_range, relative_min_range * np.maximum(np.abs(hi), 1.0)).astype(np.float32)
    return lo, np.maximum(hi - lo, floor).astype(np.float32)


def apply_scaling(x: np.ndarray, lo: np.ndarray, scale: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    """(C, ...) float32 -> clip((x - lo) / scale), lo/scale per channel."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    return np.clip((x - lo.reshape(shape)) / scale.reshape(shape), *clip)


def normalize_channels(array: np.ndarray, sequences: Sequence[str]) -> np.ndarray:
    """Segmentation input: (C, I, J, K) float array -> normalised float32 copy (weighted: p1..p99 of
    the study's foreground -> 0..1; quantitative: fixed scale)."""
    out = np.empty(array.shape, dtype=np.float32)
    weighted = [c for c, seq in enumerate(sequences) if seq not in QUANTITATIVE_SCALE]
    for c, seq in enumerate(sequences):
        if seq in QUANTITATIVE_SCALE:
            out[c] = array[c].astype(np.float32, copy=False) / QUANTITATIVE_SCALE[seq]

    def region(c: int) -> np.ndarray:
        x = array[c].astype(np.float32, copy=False)
        fg = x[x > 0]
        return fg if fg.size > MIN_FOREGROUND else x

    if weighted:
        lo, scale = percentile_scaling((region(c) for c in weighted), min_range=1e-6)
        for c, lo_c, scale_c in zip(weighted, lo, scale):
            out[c] = (array[c].astype(np.float32, copy=False) - lo_c) / scale_c
    return np.clip(out, *SEGMENTATION_CLIP, out=out)


def window_scaling(arr: np.ndarray, roi, window) -> tuple[np.ndarray, np.ndarray]:
    """Classification input: per-channel (lo, scale) from p1 / p99 inside the (image-clipped) crop window
    over the box's k-range; apply with ``apply_scaling(..., CLASSIFICATION_CLIP)``."""
    wi0, wi1, wj0, wj1 = window
    _, I, J, _ = arr.shape
    k0, k1 = int(roi[4]), int(roi[5])
    reg = arr[:, max(wi0, 0):min(wi1, I), max(wj0, 0):min(wj1, J), k0:k1].reshape(arr.shape[0], -1)
    return percentile_scaling(reg, relative_min_range=1e-3)
