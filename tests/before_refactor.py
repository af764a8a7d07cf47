"""Code as it was before the architecture pass (issue 13), copied verbatim where a library function or a
shared module replaced it: the tests compare the new code with these, on the same inputs."""

from __future__ import annotations

import numpy as np


def old_normalize_channels(array, sequences):
    out = np.empty(array.shape, dtype=np.float32)
    for c, seq in enumerate(sequences):
        x = array[c].astype(np.float32, copy=False)
        if seq in {"ADC": 3000.0}:
            out[c] = x / 3000.0
            continue
        fg = x[x > 0]
        lo, hi = np.percentile(fg if fg.size > 100 else x, (1.0, 99.0))
        out[c] = (x - lo) / max(float(hi - lo), 1e-6)
    return np.clip(out, -1.0, 3.0, out=out)


def old_normalise_stats(arr, roi, window):
    wi0, wi1, wj0, wj1 = window
    _, I, J, _ = arr.shape
    k0, k1 = int(roi[4]), int(roi[5])
    reg = arr[:, max(wi0, 0):min(wi1, I), max(wj0, 0):min(wj1, J), k0:k1].reshape(arr.shape[0], -1)
    lo = np.percentile(reg, 1, axis=1).astype(np.float32)
    hi = np.percentile(reg, 99, axis=1).astype(np.float32)
    return lo, np.maximum(hi - lo, 1e-3 * np.maximum(np.abs(hi), 1.0)).astype(np.float32)


def old_cut(vol, window, k):
    wi0, wi1, wj0, wj1 = window
    C, I, J, _ = vol.shape
    out = np.zeros((C, wi1 - wi0, wj1 - wj0), np.float32)
    a0, a1, b0, b1 = max(wi0, 0), min(wi1, I), max(wj0, 0), min(wj1, J)
    if a1 > a0 and b1 > b0:
        out[:, a0 - wi0:a1 - wi0, b0 - wj0:b1 - wj0] = vol[:, a0:a1, b0:b1, k]
    return out


def old_crop_window(roi, margin=0.25):
    i0, i1, j0, j1 = (int(v) for v in roi[:4])
    mi = max(2, int(round(margin * (i1 - i0))))
    mj = max(2, int(round(margin * (j1 - j0))))
    return i0 - mi, i1 + mi, j0 - mj, j1 + mj


def old_roi_from_mask(mask):
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return None
    return [int(v) for ax in idx for v in (ax.min(), ax.max() + 1)]


def old_box_region(roi, shape, margin=0.5, min_margin=4):
    out = []
    for axis, (lo, hi, n) in enumerate(zip(roi[0::2], roi[1::2], shape)):
        m = max(int(round((hi - lo) * margin)), min_margin if axis < 2 else 1)
        out.append(slice(max(0, lo - m), min(n, hi + m)))
    return tuple(out)


def old_feature_box(mask):  # synth/features.py: tumour box + 7 voxels
    return tuple(slice(max(int(a.min()) - 7, 0), int(a.max()) + 8) for a in np.nonzero(mask))


def old_tumour_roi(label):  # segmentation/inference.py
    from scipy import ndimage

    comps, n = ndimage.label(label == 2)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
    return old_roi_from_mask(comps == 1 + int(np.argmax(sizes)))


def old_reliability_bins(y, prob, n_bins=10):  # evaluation/metrics.py (calibration_curve replaced it)
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, float)
    if prob.ndim == 1:
        prob = np.column_stack([1 - prob, prob])
    conf, correct = prob.max(1), (prob.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out.append(((lo + hi) / 2, correct[m].mean() if m.any() else np.nan, conf[m].mean() if m.any() else np.nan, int(m.sum())))
    return np.array(out)
