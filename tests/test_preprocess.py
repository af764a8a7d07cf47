"""One normalisation module, two rules, numerics unchanged: `parotid.preprocess` gives bit-identical inputs
to the rules the shipped checkpoints were trained on (tests/before_refactor.py: the code before the
merge into one module), on the shipped sample studies and on edge cases (box at the border, constant channel,
almost no foreground)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parotid.classification import crops
from parotid.preprocess import normalize_channels
from parotid.study import read_study

from before_refactor import old_crop_window, old_cut, old_normalise_stats, old_normalize_channels

SAMPLE = Path(__file__).resolve().parents[1] / "sample-data" / "studies"


def old_crop_slices(arr, roi, size=64, n_slices=8):
    window = old_crop_window(roi)
    lo, scale = old_normalise_stats(arr, roi, window)
    ks = np.round(np.linspace(int(roi[4]), int(roi[5]) - 1, n_slices)).astype(int)
    cut = [np.clip((old_cut(arr, window, k) - lo[:, None, None]) / scale[:, None, None], -2.0, 4.0) for k in ks]
    t = torch.from_numpy(np.ascontiguousarray(np.stack(cut), dtype=np.float32))
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).numpy()


def _resize(x, size, mode):
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return F.interpolate(t, size=(size, size), mode="nearest").numpy() if mode == "nearest" else \
        F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).numpy()


def old_label_crops(arr, label, roi, n_free=3, size=64, n_slices=8):
    """gland, free, free_gland as extract_crop cut them before (window by slicing + zero padding)."""
    window = old_crop_window(roi)
    lo, scale = old_normalise_stats(arr, roi, window)
    ks = np.round(np.linspace(int(roi[4]), int(roi[5]) - 1, n_slices)).astype(int)
    lab = label[None].astype(np.float32)
    gland = _resize(np.stack([(old_cut(lab, window, k) == 1).astype(np.float32) for k in ks]), size, "nearest")
    k0, k1 = int(roi[4]), int(roi[5])
    cand = []
    for d in range(1, label.shape[2]):
        for k in (k0 - d, k1 - 1 + d):
            if 0 <= k < label.shape[2]:
                win = old_cut(lab, window, k)[0]
                if (win == 2).sum() == 0 and (win == 1).sum() > 0:
                    cand.append(k)
        if len(cand) >= n_free:
            break
    cand = cand[:n_free]
    free = _resize(np.stack([np.clip((old_cut(arr, window, k) - lo[:, None, None]) / scale[:, None, None], -2.0, 4.0)
                             for k in cand]), size, "bilinear")
    free_gland = _resize(np.stack([(old_cut(lab, window, k) == 1).astype(np.float32) for k in cand]), size, "nearest")
    return gland, free, free_gland


def test_label_crops_are_bit_identical():
    """The gland channel and the tumour-free slices (early-fusion training) from the windowed volume
    (np.pad, once per study) equal the per-slice slicing they replaced, and MONAI's SpatialCrop +
    BorderPad give the same window."""
    from monai.transforms import BorderPad, SpatialCrop
    from monai.utils import convert_to_numpy

    from parotid.study import read_label_map

    for (study, roi), sid in zip(sample_studies(3), ("syn7_0000", "syn7_0001", "syn7_0002")):
        label = read_label_map(str(SAMPLE / "labels" / "final" / f"{sid}.nii.gz"))
        for box in (roi, [0, roi[1], roi[2], study.shape[1], roi[4], roi[5]]):  # and a window outside the image
            c = crops.extract_crop(study.array(), box, label=label, n_free=3)
            w = crops.crop_window(box)
            a0, a1, b0, b1 = max(w[0], 0), min(w[1], study.shape[0]), max(w[2], 0), min(w[3], study.shape[1])
            monai_win = BorderPad(spatial_border=[a0 - w[0], w[1] - a1, b0 - w[2], w[3] - b1, 0, 0])(
                SpatialCrop(roi_start=(a0, b0, 0), roi_end=(a1, b1, study.shape[2]))(study.array()))
            assert np.array_equal(convert_to_numpy(monai_win), crops.window_volume(study.array(), w))
            for new, old in zip((c.gland, c.free, c.free_gland), old_label_crops(study.array(), label, box)):
                assert same_bits(new, old)


def sample_studies(n=4):
    with open(SAMPLE / "datastore_v2.json") as f:
        objects = json.load(f)["objects"]
    for sid in sorted(objects)[:n]:
        yield read_study(str(SAMPLE / f"{sid}.nii.gz")), objects[sid]["labels"]["final"]["info"]["roi"]


def edge_cases():
    rng = np.random.default_rng(7)
    arr = rng.gamma(2.0, 300.0, (3, 40, 36, 12)).astype(np.float32)
    arr[1] = 250.0 + rng.uniform(0.0, 0.05, arr.shape[1:])  # almost constant: the range floors decide
    arr[2] = 0.0
    arr[2, 5:8, 5:8, 2:4] = 90.0  # 18 foreground voxels: percentiles of the whole channel
    yield arr, ["T2", "T1", "CET1"], [0, 9, 30, 36, 0, 3]  # box touching the image border: window outside
    yield arr[:2] * 1e-4, ["T2", "ADC"], [10, 20, 10, 20, 4, 9]
    yield np.stack([arr[0], arr[1] * 1e-6 + 1e-3]), ["T1", "T2"], [10, 20, 10, 20, 4, 9]  # range < 1e-6


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("case", ["sample", "edge"])
def test_normalisation_is_bit_identical_to_the_rules_the_checkpoints_were_trained_on(case):
    cases = ([(s.array(), list(s.sequences), roi) for s, roi in sample_studies()] if case == "sample"
             else list(edge_cases()))
    for arr, seqs, roi in cases:
        assert same_bits(normalize_channels(arr, seqs), old_normalize_channels(arr, seqs))
        new = crops.extract_crop(arr, roi).slices
        assert same_bits(new, old_crop_slices(arr, roi))
