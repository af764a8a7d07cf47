"""Model application on a study (no MONAI Label here: used by the app, the trainers and the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from scipy import ndimage

from parotid.labels import GLAND, TUMOR
from parotid.model_space import ModelSpace, to_model_space
from parotid.preprocess import normalize_channels
from parotid.segmentation.networks import SegModelSpec
from parotid.study import Study, check_roi, grow_roi, roi_from_mask


def study_input(study: Study, spec: SegModelSpec) -> np.ndarray:
    """Normalised (C, I, J, K) input in spec.sequences order; a missing optional sequence is a zero
    channel (the models are trained with such channels dropped), a missing required one a StudyError."""
    study.require(spec.required)
    present = [s for s in spec.sequences if s in study.sequences]
    norm = normalize_channels(study.array(present), present)
    out = np.zeros((len(spec.sequences),) + tuple(study.shape), np.float32)
    for c, seq in enumerate(spec.sequences):
        if seq in present:
            out[c] = norm[present.index(seq)]
    return out


# Test-time mirroring of the whole-study segmentation: class probabilities averaged over the study and its
# left-right mirror (`mirror_flips`), as nnU-Net's mirroring but only along the one axis whose mirror is still an
# anatomy (paired parotids); the networks were trained without flips. Chosen on validation, amended after the
# held-out cohorts showed the anterior-posterior flip losing a tumour, confirmed on fresh cohorts:
# docs/results/seg_tta_rule.txt. Fixed flips, not monai.data.TestTimeAugmentation, which draws random
# transforms (a served label must not change between runs). Training validation stays single-pass
# (`SINGLE_PASS`), so rounds stay comparable with earlier ones.
Flips = Sequence[tuple[int, ...]]  # torch dims of a (1, C, I, J, K) input to flip; () = as it is
SINGLE_PASS: tuple[tuple[int, ...], ...] = ((),)
# the active-learning score's flips: the study and its 3 in-plane flips (the score's validation used these)
UNCERTAINTY_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def left_right_axis(study: Study) -> int:
    """The array axis (0 = I, 1 = J, 2 = K) closest to the patient's left-right direction (x of LPS)."""
    direction = np.asarray(study.reference.GetDirection(), float).reshape(3, 3)  # column a = axis a
    return int(np.argmax(np.abs(direction[0])))


def mirror_flips(study: Study) -> tuple[tuple[int, ...], ...]:
    """The served test-time flips of `study`: as it is, and mirrored left-right."""
    return ((), (2 + left_right_axis(study),))


@torch.no_grad()
def flip_probabilities(net: torch.nn.Module, spec: SegModelSpec, image: np.ndarray, flips: Flips) -> torch.Tensor:
    """Class probabilities (T, C, I, J, K) of the normalised (C, I, J, K) `image`, one per flip in `flips`,
    each mapped back to the unflipped grid."""
    inferer = SlidingWindowInferer(roi_size=spec.patch, sw_batch_size=2, overlap=0.25, mode="gaussian")
    x = torch.from_numpy(image)[None]
    probs = []
    for dims in flips:
        p = torch.softmax(inferer(torch.flip(x, dims) if dims else x, net), 1)
        probs.append(torch.flip(p, dims) if dims else p)
    return torch.cat(probs)


def segment(net: torch.nn.Module, spec: SegModelSpec, image: np.ndarray, flips: Flips = SINGLE_PASS) -> np.ndarray:
    """Gland + tumour label map (I, J, K) uint8 of a normalised (C, I, J, K) array, probabilities averaged
    over `flips` (an array has no orientation: the served mirroring needs the study, `segment_study`)."""
    label = flip_probabilities(net, spec, image, flips).mean(0).argmax(0).numpy().astype(np.uint8)
    return clean_label(label)


def segment_study(net: torch.nn.Module, spec: SegModelSpec, study: Study, spacing: Sequence[float] | None,
                  flips: Flips | None = None) -> tuple[np.ndarray, ModelSpace]:
    """Label map on the STUDY grid, as served: the model runs at its training `spacing` (parotid.model_space)
    on the study and its left-right mirror (`flips=None`; `SINGLE_PASS` for one pass); class probabilities
    come back linearly and are argmax-ed on the study grid."""
    space = to_model_space(study, spacing)
    flips = mirror_flips(space.model_study) if flips is None else flips
    image = study_input(space.model_study, spec)
    if not space.resampled:
        return segment(net, spec, image, flips), space
    probs = space.values_to_study(flip_probabilities(net, spec, image, flips).mean(0).numpy())
    label = probs.argmax(0).astype(np.uint8)
    return clean_label(label, min_voxels=max(1, int(round(20 * space.voxel_ratio())))), space


def clean_label(label: np.ndarray, min_voxels: int = 20) -> np.ndarray:
    """Drop specks: connected components (6-connectivity) smaller than `min_voxels`, per structure.

    Not ``monai.transforms.RemoveSmallObjects``: with the installed scikit-image 0.26, MONAI 1.4 passes
    its size to skimage's deprecated ``min_size`` argument and the result differs from "keep components
    of at least `min_voxels`" (measured against this function on random label maps: with a size of 1 it
    removes single voxels); the shipped checkpoints' subset tables were measured with this rule."""
    out = np.zeros_like(label)
    for value in (GLAND, TUMOR):
        comps, n = ndimage.label(label == value)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        keep = np.isin(comps, 1 + np.flatnonzero(sizes >= min_voxels))
        out[keep] = value
    return out


def tumour_roi(label: np.ndarray) -> list[int] | None:
    """Box of the largest tumour component (bilateral / multiple tumours: the index tumour).

    Not ``monai.transforms.KeepLargestConnectedComponent``: on equal-size components it keeps another
    one than this (first in raster order), so the automatic box would change (tests/test_boxes.py
    compares against a copy of this function; the MONAI variant failed it on a tie)."""
    comps, n = ndimage.label(label == TUMOR)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
    return roi_from_mask(comps == 1 + int(np.argmax(sizes)))


# score of a study with no predicted tumour: above any flip variance of class probabilities (at most 8/9
# for 4 flips and 3 classes), so a study where the model finds no tumour is proposed first for tumour annotation
NO_TUMOUR_SCORE = 1.0


@dataclass(frozen=True)
class FlipUncertainty:
    """Test-time-flip uncertainty of one study: mean per-voxel variance of the class probabilities over
    the flips (summed over classes; 0 = all flips agree), inside the predicted gland + tumour and inside
    the predicted tumour alone."""

    foreground: float
    tumour: float


@torch.no_grad()
def segment_with_uncertainty(net: torch.nn.Module, spec: SegModelSpec, image: np.ndarray,
                             served_flips: Flips = SINGLE_PASS) -> tuple[np.ndarray, FlipUncertainty]:
    """Label map (averaged over `served_flips`: pass `mirror_flips(study)` for the served label) plus the
    disagreement of the 4 `UNCERTAINTY_FLIPS` (`FlipUncertainty`).

    The tumour score exists because the foreground score is dominated by the gland, the larger
    structure: on 102 held-out SYNTHETIC studies (seeds 521-525, served checkpoint) Spearman's rho with
    the tumour Dice error was 0.27 for the foreground score and 0.76 for the tumour score
    (`python -m parotid.segmentation.uncertainty_eval`, docs/annotator.md).

    Not ``monai.data.TestTimeAugmentation``: it needs random transforms and draws `num_examples` of them,
    so the score (stored per study for active learning) would become random instead of these 4 fixed
    flips; MONAI Label's ``EpistemicScoring`` is a different measure (dropout samples of the network)."""
    stack = flip_probabilities(net, spec, image, UNCERTAINTY_FLIPS)  # (T, C, I, J, K)
    extra = [f for f in served_flips if f not in UNCERTAINTY_FLIPS]  # e.g. a left-right axis K
    served = [stack[UNCERTAINTY_FLIPS.index(f)] for f in served_flips if f in UNCERTAINTY_FLIPS]
    if extra:
        served += list(flip_probabilities(net, spec, image, extra))
    label = clean_label(torch.stack(served).mean(0).argmax(0).numpy().astype(np.uint8))
    fg, tumour = label > 0, label == TUMOR
    var = stack.var(0).sum(0).numpy()
    return label, FlipUncertainty(foreground=float(var[fg].mean()) if fg.any() else 0.0,
                                  tumour=float(var[tumour].mean()) if tumour.any() else NO_TUMOUR_SCORE)


# ---------------------------------------------------------------- box-prompted contouring
# context around the prompt box seen by the box-prompted model (contour_box checkpoint trained on it)
BOX_CONTEXT_MARGIN = 0.5  # of the box size, every axis
BOX_CONTEXT_MIN_MARGIN = (4, 4, 1)  # voxels: in-plane, through-plane


def box_region(roi: Sequence[int], shape: Sequence[int], margin: float = BOX_CONTEXT_MARGIN,
               min_margin: int = BOX_CONTEXT_MIN_MARGIN[0]) -> tuple[slice, ...]:
    """The crop around a box: the box grown by `margin` of its size (at least `min_margin` voxels
    in-plane, 1 slice through-plane), clipped to the image."""
    check_roi(roi, shape)
    grown = grow_roi(roi, margin=(margin,) * 3, min_margin=(min_margin, min_margin, BOX_CONTEXT_MIN_MARGIN[2]),
                     shape=shape)
    return tuple(slice(lo, hi) for lo, hi in zip(grown[0::2], grown[1::2]))


def box_input(image: np.ndarray, roi: Sequence[int], spec: SegModelSpec) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Crop (C, I, J, K) to the box region, add the box as a mask channel, resize to spec.patch."""
    shape = image.shape[1:]
    region = box_region(roi, shape)
    box = check_roi(roi, shape)
    mask = np.zeros(shape, np.float32)
    mask[box] = 1.0
    # plain slicing: MONAI SpatialCrop(roi_slices=region) gives the same tensor (tests/test_boxes.py) but
    # costs ~45 ms per call (MetaTensor bookkeeping), paid on every training sample of the box model
    crop = np.concatenate([image[(slice(None),) + region], mask[region][None]], 0)
    t = torch.from_numpy(np.ascontiguousarray(crop))[None]
    return F.interpolate(t, size=spec.patch, mode="trilinear", align_corners=False), region


@torch.no_grad()
def box_probability(net: torch.nn.Module, spec: SegModelSpec, image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Tumour probability (I, J, K) float32 from the box-prompted model, inside the box only: the model
    sees the box grown by a margin, but a contour never extends past the box it was given."""
    x, region = box_input(image, roi, spec)
    logits = net(x)
    size = tuple(s.stop - s.start for s in region)
    prob = torch.softmax(F.interpolate(logits, size=size, mode="trilinear", align_corners=False), 1)[0, 1]
    region_prob = np.zeros(image.shape[1:], np.float32)
    region_prob[region] = prob.numpy()
    return _inside_box(region_prob, roi)


def _inside_box(values: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    out = np.zeros_like(values)
    box = check_roi(roi, values.shape)
    out[box] = values[box]
    return out


def contour_in_box(net: torch.nn.Module, spec: SegModelSpec, image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Tumour label map (I, J, K) uint8 (value TUMOR) from the box-prompted model, inside the box only."""
    return (box_probability(net, spec, image, roi) > 0.5).astype(np.uint8) * TUMOR


def contour_study(net: torch.nn.Module, spec: SegModelSpec, study: Study, roi: Sequence[int],
                  spacing: Sequence[float] | None) -> tuple[np.ndarray, ModelSpace]:
    """Tumour label map on the STUDY grid for a box on the study grid: the box goes to the model's
    grid (same physical region), the model runs at its training `spacing`, the probability comes back
    and is cut at the study-grid box (interpolation must not carry it past the box)."""
    check_roi(roi, study.shape)
    space = to_model_space(study, spacing)
    prob = box_probability(net, spec, study_input(space.model_study, spec), space.roi_to_model(roi))
    return (_inside_box(space.values_to_study(prob), roi) > 0.5).astype(np.uint8) * TUMOR, space


def dice(a: np.ndarray, b: np.ndarray) -> float:
    # numpy on two boolean masks; monai.metrics.compute_dice wants one-hot batched tensors and
    # returns NaN for two empty masks, where a score of 1 is the answer here
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)
