"""Box crops: the only image data the classifiers see (performance design).

For a study array ``(C, I, J, K)`` and a box ``roi = [i0, i1, j0, j1, k0, k1]`` (half-open, reference
grid) we

1. normalise every sequence per study by percentile scaling (p1 -> 0, p99 -> 1) computed inside the
   3D crop window (box + margin in i/j, the box's k-range), so scanner gain does not matter
   (``parotid.preprocess``: the classification rule, and why it differs from segmentation's);
2. take ``n_slices`` axial slices sampled evenly over the box's k-range (repeats when the tumour has
   fewer slices), cut the window ``box +- margin`` (zero padding outside the image) and resample it
   to ``size x size`` (bilinear, antialiased);
3. return the box's position inside the crop (``[x1, y1, x2, y2]`` in crop pixels, x along J,
   y along I) for ``torchvision.ops.roi_align``.

Optionally, tumour-free slices (k outside the tumour, gland present) are cut with the same window
for the slice-level "tumour-free" class of the early-fusion ResNet (seed 001).

``paste_heatmap`` maps per-slice maps back onto the reference grid (heatmap volumes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from parotid.labels import GLAND, TUMOR
from parotid.preprocess import CLASSIFICATION_CLIP, apply_scaling, window_scaling
from parotid.study import grow_roi

DEFAULT_SIZE = 64
DEFAULT_SLICES = 8
DEFAULT_MARGIN = 0.25  # of the box size, in-plane
CROP_MIN_MARGIN = 2  # voxels


@dataclass
class Crop:
    slices: np.ndarray  # (N, C, S, S) float32, normalised
    box: np.ndarray  # (4,) float32 [x1, y1, x2, y2] in crop pixels
    ks: np.ndarray  # (N,) int, the k index of each slice on the reference grid
    window: tuple[int, int, int, int]  # (wi0, wi1, wj0, wj1), may extend beyond the image
    gland: np.ndarray | None = None  # (N, 1, S, S) gland-mask channel
    free: np.ndarray | None = None  # (M, C, S, S) tumour-free slices (M may be 0)
    free_gland: np.ndarray | None = None


def crop_window(roi, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """(wi0, wi1, wj0, wj1): the box grown in-plane by `margin` of its size (at least 2 voxels), NOT
    clipped (zero padding outside the image); the classifier checkpoints were trained on this window."""
    wi0, wi1, wj0, wj1, _, _ = grow_roi(list(roi[:4]) + [0, 1], margin=(margin, margin, 0.0),
                                        min_margin=(CROP_MIN_MARGIN, CROP_MIN_MARGIN, 0))
    return wi0, wi1, wj0, wj1


def box_in_crop(roi, window, size: int) -> np.ndarray:
    i0, i1, j0, j1 = (int(v) for v in roi[:4])
    wi0, wi1, wj0, wj1 = window
    si, sj = size / (wi1 - wi0), size / (wj1 - wj0)
    return np.array([(j0 - wj0) * sj, (i0 - wi0) * si, (j1 - wj0) * sj, (i1 - wi0) * si], np.float32)


def window_volume(vol: np.ndarray, window) -> np.ndarray:
    """vol (C, I, J, K) -> (C, wi, wj, K) float32: the in-plane window over all slices, zero-padded
    outside the image. numpy slicing + ``np.pad``, not MONAI ``SpatialCrop`` + ``BorderPad``: those give
    the same array but cost ~45 ms per call here (MetaTensor bookkeeping; measured on a sample study,
    2-core machine under load) against < 1 ms, on every classification and every training crop."""
    wi0, wi1, wj0, wj1 = window
    C, I, J, K = vol.shape
    a0, a1, b0, b1 = max(wi0, 0), min(wi1, I), max(wj0, 0), min(wj1, J)
    if a1 <= a0 or b1 <= b0:
        return np.zeros((C, wi1 - wi0, wj1 - wj0, K), np.float32)
    inside = vol[:, a0:a1, b0:b1, :].astype(np.float32, copy=False)
    return np.pad(inside, [(0, 0), (a0 - wi0, wi1 - a1), (b0 - wj0, wj1 - b1), (0, 0)])


def _resize(x: np.ndarray, size: int, mode="bilinear") -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if mode == "nearest":
        t = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.numpy()


def sample_ks(k0: int, k1: int, n: int) -> np.ndarray:
    return np.round(np.linspace(k0, k1 - 1, n)).astype(int)


def unique_slices(ks) -> np.ndarray:
    """Positions of the first crop of each distinct slice index in `ks`, in slice order: a tumour
    with fewer slices than ``n_slices`` is sampled with repeats, and a repeat is not a new slice."""
    _, first = np.unique(np.asarray(ks), return_index=True)
    return np.sort(first)


def extract_crop(arr: np.ndarray, roi, size: int = DEFAULT_SIZE, n_slices: int = DEFAULT_SLICES,
                 margin: float = DEFAULT_MARGIN, label: np.ndarray | None = None, n_free: int = 0,
                 gland_value: int = GLAND, tumor_value: int = TUMOR) -> Crop:
    """Cut the classifier input for one study. `arr` is (C, I, J, K); `label` an optional (I, J, K) map."""
    window = crop_window(roi, margin)
    lo, scale = window_scaling(arr, roi, window)
    ks = sample_ks(int(roi[4]), int(roi[5]), n_slices)

    img_win = window_volume(arr, window)

    def cut(k):
        return apply_scaling(img_win[..., k], lo, scale, CLASSIFICATION_CLIP)

    slices = _resize(np.stack([cut(k) for k in ks]), size)
    crop = Crop(slices=slices, box=box_in_crop(roi, window, size), ks=ks, window=window)
    if label is not None:
        lab_win = window_volume(label[None].astype(np.float32), window)
        crop.gland = _resize(np.stack([(lab_win[..., k] == gland_value).astype(np.float32) for k in ks]), size, "nearest")
        if n_free > 0:
            k0, k1 = int(roi[4]), int(roi[5])
            cand = []
            for d in range(1, label.shape[2]):
                for k in (k0 - d, k1 - 1 + d):
                    if 0 <= k < label.shape[2]:
                        win = lab_win[0, ..., k]
                        if (win == tumor_value).sum() == 0 and (win == gland_value).sum() > 0:
                            cand.append(k)
                if len(cand) >= n_free:
                    break
            cand = cand[:n_free]
            if cand:
                crop.free = _resize(np.stack([cut(k) for k in cand]), size)
                crop.free_gland = _resize(np.stack([(lab_win[..., k] == gland_value).astype(np.float32) for k in cand]), size, "nearest")
            else:
                crop.free = np.zeros((0, arr.shape[0], size, size), np.float32)
                crop.free_gland = np.zeros((0, 1, size, size), np.float32)
    return crop


def paste_heatmap(maps: np.ndarray, crop: Crop, shape, roi) -> np.ndarray:
    """Per-slice maps (N, S, S) -> (I, J, K) float32 volume on the reference grid.

    Every k of the box's k-range takes the map of the nearest sampled slice (maps of repeated
    slices are averaged). The result is NOT normalised (joint normalisation is the caller's job).

    Not MONAI's inverse transforms (``run_invert_transforms``): the forward path resizes with torch's
    antialiased bilinear filter (not MONAI ``Resize``'s Gaussian anti-aliasing: changing it changes the
    classifiers' input) and samples k with repeats, which has no invertible MONAI transform.
    """
    I, J, K = shape
    wi0, wi1, wj0, wj1 = crop.window
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None],
                       size=(wi1 - wi0, wj1 - wj0), mode="bilinear", align_corners=False)[:, 0].numpy()
    vol = np.zeros((I, J, K), np.float32)
    a0, a1, b0, b1 = max(wi0, 0), min(wi1, I), max(wj0, 0), min(wj1, J)
    uniq = {}
    for m, k in zip(up, crop.ks):
        uniq.setdefault(int(k), []).append(m)
    per_k = {k: np.mean(v, axis=0) for k, v in uniq.items()}
    sampled = np.array(sorted(per_k))
    for k in range(int(roi[4]), int(roi[5])):
        kk = int(sampled[np.argmin(np.abs(sampled - k))])
        vol[a0:a1, b0:b1, k] = per_k[kk][a0 - wi0:a1 - wi0, b0 - wj0:b1 - wj0]
    return vol
