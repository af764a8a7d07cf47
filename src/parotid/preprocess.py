"""Intensity normalisation of study channels — one place, shared by segmentation and classification.

Weighted MR sequences have arbitrary units: each is scaled per study by robust percentiles.
Quantitative maps keep their meaning: ADC (1e-6 mm^2/s) is divided by a fixed constant so that
"low ADC" stays low across studies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

QUANTITATIVE_SCALE = {"ADC": 3000.0}  # ADC 0..3000e-6 mm^2/s -> 0..1
PERCENTILES = (1.0, 99.0)


def normalize_channels(array: np.ndarray, sequences: Sequence[str]) -> np.ndarray:
    """(C, I, J, K) float array -> normalised float32 copy (weighted: p1..p99 -> 0..1)."""
    out = np.empty(array.shape, dtype=np.float32)
    for c, seq in enumerate(sequences):
        x = array[c].astype(np.float32, copy=False)
        if seq in QUANTITATIVE_SCALE:
            out[c] = x / QUANTITATIVE_SCALE[seq]
            continue
        fg = x[x > 0]
        lo, hi = np.percentile(fg if fg.size > 100 else x, PERCENTILES)
        out[c] = (x - lo) / max(float(hi - lo), 1e-6)
    return np.clip(out, -1.0, 3.0, out=out)
