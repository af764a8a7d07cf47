"""Models see physical space: a study is resampled to the model's training spacing, results come back.

Every checkpoint records the voxel spacing its network was trained at (key ``spacing``:
``[sx, sy, sz]`` mm in ITK index order I, J, K). At inference, `to_model_space` resamples the study
(SimpleITK, linear, in physical space) onto a grid with the study's direction and field of view and
the model's spacing; the model runs there; `ModelSpace` maps its outputs back onto the study's
reference grid (labels nearest-neighbour, probabilities and heatmaps linear) and boxes between the
two grids through physical space. Volumes are measured on the study grid by the callers.

A study whose spacing equals the model's within ``SPACING_RTOL`` (relative, per axis) is NOT
resampled: the model sees the study's own voxels (bit-identical to running without this module).
A checkpoint without ``spacing`` (trained before this existed, or uploaded by hand) is run in voxel
space and results say so (``model_spacing: null``).

``python -m parotid.model_space stamp-spacing CKPT --spacing SX SY SZ`` adds the key to a checkpoint,
keeping every other key and the weights bit-identical (idempotent).
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from parotid.study import Study, StudyError, check_roi, copy_geometry

SPACING_KEY = "spacing"
# 1 %: spacings written by scanners/converters differ in the last digits (1.5 vs 1.50000012); a
# 1 % zoom is far inside what the networks tolerate, and resampling would only blur the image.
SPACING_RTOL = 0.01


# --------------------------------------------------------------------------- checkpoints
def checkpoint_spacing(ckpt: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
    """The training spacing a checkpoint dict (or a classifier config) records, or None."""
    sp = (ckpt or {}).get(SPACING_KEY)
    if sp is None:
        return None
    sp = tuple(float(v) for v in sp)
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise StudyError(f"checkpoint spacing must be 3 positive numbers (mm), got {list(sp)}")
    return sp  # type: ignore[return-value]


def training_spacing(spacings: Iterable[Sequence[float]]) -> list[float]:
    """The spacing a model is trained at: per-axis median of the training studies' spacings."""
    arr = np.array([list(s) for s in spacings], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3 or not len(arr):
        raise ValueError("need the spacing of at least one training study")
    return [round(float(v), 6) for v in np.median(arr, axis=0)]


def file_spacing(path: str) -> tuple[float, float, float]:
    """Voxel spacing of an image file from its header only (no pixel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(float(v) for v in reader.GetSpacing()[:3])  # type: ignore[return-value]


def stamp_spacing(path: str, spacing: Sequence[float]) -> bool:
    """Add ``spacing`` to a checkpoint file in place (atomic), keeping every other key. Returns False
    when it already records this spacing (nothing written), raises if it records another one."""
    import torch

    sp = [float(v) for v in spacing]
    checkpoint_spacing({SPACING_KEY: sp})  # validates
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    # classifier checkpoints keep their settings in ck["config"] (what predict.classify reads)
    target = ck["config"] if isinstance(ck.get("config"), dict) else ck
    old = target.get(SPACING_KEY)
    if old is not None:
        if np.allclose(old, sp, rtol=0, atol=1e-9):
            return False
        raise ValueError(f"{path} already records spacing {list(old)}; refusing to change it to {sp}")
    target[SPACING_KEY] = sp
    tmp = path + ".part"
    torch.save(ck, tmp)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------- grids
def needs_resampling(study_spacing: Sequence[float], model_spacing: Sequence[float] | None,
                     rtol: float = SPACING_RTOL) -> bool:
    if model_spacing is None:
        return False
    s, m = np.asarray(study_spacing, float), np.asarray(model_spacing, float)
    return bool(np.any(np.abs(s - m) > rtol * m))


def model_grid(reference: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """An empty grid with `reference`'s direction and field of view (outer voxel faces) at `spacing`."""
    old_sp = np.array(reference.GetSpacing(), float)
    new_sp = np.array(spacing, float)
    extent = np.array(reference.GetSize()) * old_sp
    size = [max(2, int(round(e / s))) for e, s in zip(extent, new_sp)]
    D = np.array(reference.GetDirection(), float).reshape(3, 3)
    # first voxel centre half a (new) voxel inside the same outer face as the reference's
    origin = np.array(reference.GetOrigin(), float) + D @ ((new_sp - old_sp) / 2.0)
    grid = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in new_sp])
    grid.SetOrigin([float(v) for v in origin])
    grid.SetDirection(reference.GetDirection())
    return grid


def map_roi(roi: Sequence[int], src: sitk.Image, dst: sitk.Image) -> list[int]:
    """A half-open voxel box on grid `src` -> the box on grid `dst` covering the same physical region.

    The 8 outer corners of the box (voxel faces, continuous index -0.5 / +0.5) go through physical
    space (ITK's index <-> point transforms); each face is rounded to the nearest face of `dst` (ties outward;
    error at most half a `dst` voxel per face), clipped to `dst` and kept at least one voxel thick."""
    check_roi(roi, src.GetSize())
    lo = [roi[0], roi[2], roi[4]]
    hi = [roi[1], roi[3], roi[5]]
    pts = []
    for corner in itertools.product(*zip(lo, hi)):
        p = src.TransformContinuousIndexToPhysicalPoint([float(c) - 0.5 for c in corner])
        pts.append(np.array(dst.TransformPhysicalPointToContinuousIndex(p)) + 0.5)
    pts = np.array(pts)
    out = []
    eps = 1e-6  # float noise; a face exactly between two `dst` faces goes outward
    for axis, n in enumerate(dst.GetSize()):
        a = int(np.clip(np.floor(pts[:, axis].min() + 0.5 - eps), 0, n - 1))
        b = int(np.clip(np.ceil(pts[:, axis].max() - 0.5 + eps), a + 1, n))
        out += [a, b]
    return out


def _resample(img: sitk.Image, grid: sitk.Image, interpolator) -> sitk.Image:
    return sitk.Resample(img, grid, sitk.Transform(), interpolator, 0.0, img.GetPixelID())


def _to_image(arr: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """(I, J, K) or channel-first (C, I, J, K) array -> image on `grid`."""
    if arr.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    return copy_geometry(img, grid)


def _to_array(img: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(img)
    return np.transpose(arr, (3, 2, 1, 0)) if img.GetNumberOfComponentsPerPixel() > 1 else arr.T


# --------------------------------------------------------------------------- the mapping
@dataclass
class ModelSpace:
    """A study as a model sees it (`model_study`) and the way back to the study's grid."""

    study: Study
    model_study: Study
    spacing: tuple[float, float, float] | None  # the model's training spacing (None: not recorded)
    resampled: bool

    @property
    def params(self) -> dict:
        """What results report: the spacing the model ran at (None: voxel space) and whether it resampled."""
        ran_at = None if self.spacing is None else [float(v) for v in self.model_study.image.GetSpacing()]
        return {"model_spacing": ran_at, "resampled": self.resampled}

    def roi_to_model(self, roi: Sequence[int]) -> list[int]:
        roi = [int(v) for v in roi]
        return map_roi(roi, self.study.reference, self.model_study.reference) if self.resampled else roi

    def roi_to_study(self, roi: Sequence[int] | None) -> list[int] | None:
        if roi is None or not self.resampled:
            return None if roi is None else [int(v) for v in roi]
        return map_roi(roi, self.model_study.reference, self.study.reference)

    def values_to_study(self, values: np.ndarray) -> np.ndarray:
        """(I, J, K) or (C, I, J, K) float values (probabilities, heatmaps) -> study grid (linear)."""
        if not self.resampled:
            return values
        img = _resample(_to_image(values.astype(np.float32, copy=False), self.model_study.reference),
                        self.study.reference, sitk.sitkLinear)
        return _to_array(img).astype(np.float32, copy=False)

    def voxel_ratio(self) -> float:
        """Model voxel volume / study voxel volume (to keep size thresholds physical)."""
        return float(np.prod(self.model_study.image.GetSpacing()) / np.prod(self.study.image.GetSpacing()))


def to_model_space(study: Study, spacing: Sequence[float] | None, rtol: float = SPACING_RTOL) -> ModelSpace:
    """Resample `study` to a model's training `spacing` (linear, physical space, 0 outside), unless it
    is already there within `rtol` or `spacing` is None (then the study itself is the model's input)."""
    sp = None if spacing is None else tuple(float(v) for v in spacing)
    if not needs_resampling(study.image.GetSpacing(), sp, rtol):
        return ModelSpace(study, study, sp, False)  # type: ignore[arg-type]
    grid = model_grid(study.reference, sp)
    img = _resample(study.image, grid, sitk.sitkLinear)
    return ModelSpace(study, Study(copy_geometry(img, grid), study.sequences), sp, True)  # type: ignore[arg-type]


def label_to_model(label: np.ndarray, space: ModelSpace) -> np.ndarray:
    """(I, J, K) label map on the study grid -> model grid (nearest; for training on resampled studies)."""
    if not space.resampled:
        return label
    img = _resample(_to_image(label, space.study.reference), space.model_study.reference, sitk.sitkNearestNeighbor)
    return _to_array(img).astype(label.dtype, copy=False)


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parotid.model_space",
                                 description="Record a model's training spacing in its checkpoint.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stamp-spacing", help="add 'spacing' [sx, sy, sz] mm (ITK I, J, K order); idempotent")
    st.add_argument("checkpoints", nargs="+")
    st.add_argument("--spacing", nargs=3, type=float, required=True, metavar=("SX", "SY", "SZ"))
    a = ap.parse_args(argv)
    for path in a.checkpoints:
        try:
            changed = stamp_spacing(path, a.spacing)
        except (ValueError, StudyError, OSError) as e:
            ap.exit(2, f"error: {e}\n")
        print(f"{path}: {'spacing ' + str(a.spacing) + ' added' if changed else 'already records this spacing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
