"""Boxes from masks and boxes grown by a margin come from one place (`parotid.study.mask_box`,
`roi_from_mask`, `grow_roi`; MONAI's generate_spatial_bounding_box underneath) and give the same boxes as
the hand-written code they replaced (copied below), for both margins in use: the classifier's crop window
(0.25 of the box, >= 2 voxels, in-plane, unclipped) and the box-prompted model's context (0.5, >= 4 voxels
in-plane / 1 slice, clipped)."""

from __future__ import annotations

import numpy as np

from parotid.classification.crops import crop_window
from parotid.segmentation.inference import box_region
from parotid.study import mask_box, roi_from_mask

from before_refactor import old_box_region, old_crop_window, old_feature_box, old_roi_from_mask, old_tumour_roi


def random_masks(n=60, shape=(30, 26, 12)):
    rng = np.random.default_rng(3)
    for _ in range(n):
        m = np.zeros(shape, bool)
        for _ in range(rng.integers(1, 4)):
            lo = [rng.integers(0, s) for s in shape]
            hi = [lo_ + rng.integers(1, s - lo_ + 1) for lo_, s in zip(lo, shape)]
            m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random() < 0.9
        yield m


def test_boxes_equal_the_hand_written_ones():
    shape = (30, 26, 12)
    n = 0
    for m in random_masks(shape=shape):
        roi = roi_from_mask(m)
        assert roi == old_roi_from_mask(m)
        if roi is None:
            continue
        n += 1
        start, end = mask_box(m, margin=7)
        assert tuple(slice(a, b) for a, b in zip(start, end)) == tuple(
            slice(s.start, min(s.stop, n_)) for s, n_ in zip(old_feature_box(m), shape))
        for margin in (0.25, 0.4):
            assert crop_window(roi, margin) == old_crop_window(roi, margin)
        assert box_region(roi, shape) == old_box_region(roi, shape)
        assert box_region(roi, shape, 0.3, 2) == old_box_region(roi, shape, 0.3, 2)
    assert n > 40
    assert roi_from_mask(np.zeros(shape)) is None and mask_box(np.zeros(shape)) is None


def test_index_tumour_box_equals_the_hand_written_one():
    """tumour_roi against a copy of itself before this pass, on random label maps with specks, touching
    structures and equal-size tumours (ties: the first in raster order). MONAI's KeepLargestConnectedComponent
    failed this on a tie, so tumour_roi keeps scipy.ndimage (its docstring)."""
    from parotid.segmentation.inference import tumour_roi

    rng = np.random.default_rng(5)
    for t in range(40):
        label = (rng.random((24, 20, 10)) < 0.08).astype(np.uint8) * rng.integers(1, 3, (24, 20, 10)).astype(np.uint8)
        for _ in range(3):  # blobs of gland / tumour of random size, some equal (ties)
            lo = rng.integers(0, [20, 16, 8])
            size = rng.integers(1, 5, 3) if t % 2 else np.array([3, 3, 2])
            label[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = rng.integers(1, 3)
        assert tumour_roi(label) == old_tumour_roi(label)
    assert tumour_roi(np.zeros((4, 4, 4), np.uint8)) is None


def test_box_prompt_input_crop_equals_slicing():
    """box_input's crop (plain slicing) equals MONAI SpatialCrop's, and the region is the old one."""
    import torch
    import torch.nn.functional as F

    from monai.transforms import SpatialCrop
    from monai.utils import convert_to_numpy

    from parotid.segmentation.inference import box_input
    from parotid.segmentation.networks import SPECS
    from parotid.study import check_roi

    spec = SPECS["contour_box"]
    img = np.random.default_rng(0).random((2, 40, 36, 14)).astype(np.float32)
    for roi in ([5, 15, 6, 20, 2, 6], [0, 40, 0, 36, 0, 14], [30, 40, 30, 36, 10, 14]):
        x, region = box_input(img, roi, spec)
        mask = np.zeros(img.shape[1:], np.float32)
        mask[check_roi(roi, img.shape[1:])] = 1.0
        crop = convert_to_numpy(SpatialCrop(roi_slices=region)(np.concatenate([img, mask[None]], 0)))
        assert region == old_box_region(roi, img.shape[1:])
        assert torch.equal(x, F.interpolate(torch.from_numpy(crop)[None], size=spec.patch, mode="trilinear",
                                            align_corners=False))
