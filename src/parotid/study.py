"""Multi-sequence MRI studies: validation, resampling onto the reference grid, and study files.

A *study* is one patient examination with several MRI sequences that differ in spacing, extent
and orientation. It is stored as ONE file so that MONAI Label's LocalDatastore sees one image per
study (``next_sample`` returns studies, labels attach to studies):

* ``<study_id>.nii.gz`` — a multi-component (vector) NIfTI on the study's *reference grid*
  (default CE-T1, else T2, see ``sequences.reference_key``), one component per present sequence,
  each resampled in physical space with SimpleITK (linear interpolation, 0 outside coverage);
* the NIfTI ``descrip`` header field lists the components: ``parotid:CET1,T2,ADC`` — so the file
  is self-describing and a study uploaded through ``PUT /datastore`` keeps its sequence names.

Array convention everywhere in this package: channel-first ``(C, I, J, K)`` with I, J, K the ITK
index axes (MONAI's ITKReader convention). Boxes (``roi``) are ``[i0, i1, j0, j1, k0, k1]`` voxel
indices on the reference grid, half-open like Python slices ``[i0:i1, j0:j1, k0:k1]`` (the
convention of MONAI Label's scribbles/ROI transforms).
"""

from __future__ import annotations

import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence as Seq

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from parotid.sequences import SEQUENCE_KEYS, check_keys, reference_key

DESCRIP_PREFIX = "parotid:"
_NOTES_KEY = "ITK_FileNotes"  # ITK's NIfTI IO maps this metadata entry to the `descrip` header field


class StudyError(ValueError):
    """A study or its parameters cannot be used. The message is meant for the user (HTTP 4xx)."""


class NotFoundError(StudyError):
    """The named study or label does not exist (HTTP 404)."""


# --------------------------------------------------------------------------- volumes
NIFTI_EXT = (".nii", ".nii.gz")
IMPORT_HINT = "make studies with the `parotid-import` command (docs/data-format.md)"


def read_volume(path: str, name: str = "image") -> sitk.Image:
    """Read an image file (NIfTI-1/-2 with or without header extensions, NRRD, MHA, or a DICOM series
    folder) with clear errors that never show server paths."""
    if not os.path.exists(path):
        raise StudyError(f"{name}: file not found: {os.path.basename(path)}")
    try:
        if os.path.isdir(path):
            from parotid.pacs.convert import read_dicom_folder  # DICOM geometry checks live there

            return read_dicom_folder(path, name)
        if path.lower().endswith(NIFTI_EXT):
            return _read_nifti(path, name)
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise StudyError(f"{name}: corrupt or unreadable image ({scrub_paths(_first_line(e), path)})") from None


def _read_nifti(path: str, name: str) -> sitk.Image:
    """nibabel parses the header (NIfTI-1 or NIfTI-2, extensions included) and reads the whole payload, so
    a truncated gzip stream or payload and NaN voxels are refused here: ITK silently zero-fills a truncated
    file and drops NaN from vector images. ITK then reads the image for its geometry conventions (the
    study files are written by ITK); SimpleITK has no NIfTI-2 reader, so NIfTI-2 is handed to it as the
    equivalent NIfTI-1 written by nibabel."""
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types on nonsense headers
        raise StudyError(f"{name}: corrupt or unreadable NIfTI file ({type(e).__name__}: "
                         f"{scrub_paths(_first_line(e), path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise StudyError(f"{name}: not a NIfTI-1/NIfTI-2 image (nibabel reads it as {type(img).__name__})")
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        first = scrub_paths(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, path)[:200]
        what = "truncated NIfTI" if first.startswith("Expected") else "corrupt or truncated file"
        raise StudyError(f"{name}: {what} ({first})") from None
    except MemoryError:
        raise StudyError(f"{name}: image of size {list(img.shape)} needs more memory than the server allows "
                         "for one file") from None
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise StudyError(f"{name}: contains NaN or infinite voxels")
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    scaled_vector = len(img.shape) > 3 and (slope != 1.0 or inter != 0.0)
    if isinstance(img, nib.Nifti2Image) or scaled_vector:
        # SimpleITK 2.5 cannot read NIfTI-2, and its NIfTI reader corrupts the heap on a multi-component
        # image with scl_slope/scl_inter (a study re-saved as scaled int16 by nibabel): ITK gets the same
        # image as a NIfTI-1 written by nibabel, the scaling applied (float32).
        try:
            hdr = nib.Nifti1Header.from_header(img.header)
            if scaled_vector:
                data = data.astype(np.float32)
                hdr.set_data_dtype(np.float32)
            as_n1 = nib.Nifti1Image(data, img.affine, header=hdr)
            as_n1.header.set_slope_inter(1.0, 0.0)
        except Exception as e:  # noqa: BLE001 - e.g. a dimension beyond NIfTI-1's int16 range
            raise StudyError(f"{name}: NIfTI image cannot be read ({type(e).__name__}: {_first_line(e)})") from None
        with tempfile.TemporaryDirectory(prefix="parotid-nifti-") as tmp:
            n1_path = os.path.join(tmp, "image.nii")
            nib.save(as_n1, n1_path)
            return sitk.ReadImage(n1_path)
    return sitk.ReadImage(path)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    return msg[:200]


_ABS_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s\"'/\\]+[/\\])+([^\s\"'/\\]*)")


def scrub_paths(msg: str, path: str = "") -> str:
    """Reader messages name the file by its full (server-side, often temporary) path: keep the base name."""
    if path:
        msg = msg.replace(os.path.abspath(path), os.path.basename(path)).replace(path, os.path.basename(path))
    return _ABS_PATH.sub(lambda m: m.group(1) or "<folder>", msg)


def validate_volume(img: sitk.Image, name: str) -> sitk.Image:
    """A sequence must be a finite 3D scalar volume; 4D with one time point is squeezed."""
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise StudyError(f"{name}: expected a 3D volume, got {img.GetDimension()}D of size {list(img.GetSize())}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(f"{name}: expected a scalar volume, got {img.GetNumberOfComponentsPerPixel()} components")
    if min(img.GetSize()) < 2:
        raise StudyError(f"{name}: volume of size {list(img.GetSize())} is not 3D (a 2D slice?)")
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise StudyError(f"{name}: contains NaN or infinite voxels")
    return img


# --------------------------------------------------------------------------- geometry
def resample_onto(img: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resample `img` onto `reference`'s grid in physical space (identity transform, 0 outside)."""
    return sitk.Resample(img, reference, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def grid_differences(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> list[str]:
    """What differs between `a`'s grid and `b`'s (size, origin, spacing, direction), with both values,
    e.g. ``["origin [0, 0, 2.5] vs [0, 0, 0]"]``; empty when ``same_grid(a, b, tol)``."""
    def fmt(v) -> str:
        return "[" + ", ".join(f"{float(x):.6g}" for x in v) + "]"

    out = [] if a.GetSize() == b.GetSize() else [f"size {list(a.GetSize())} vs {list(b.GetSize())}"]
    for name, get in (("origin", sitk.Image.GetOrigin), ("spacing", sitk.Image.GetSpacing),
                      ("direction", sitk.Image.GetDirection)):
        va, vb = get(a), get(b)
        if len(va) != len(vb) or not np.allclose(va, vb, atol=tol):
            out.append(f"{name} {fmt(va)} vs {fmt(vb)}")
    return out


def copy_geometry(img: sitk.Image, reference: sitk.Image) -> sitk.Image:
    img.SetSpacing(reference.GetSpacing())
    img.SetOrigin(reference.GetOrigin())
    img.SetDirection(reference.GetDirection())
    return img


def scalar_grid(img: sitk.Image) -> sitk.Image:
    """An empty scalar image with `img`'s grid (for resampling onto it and building label maps)."""
    ref = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    return copy_geometry(ref, img)


# --------------------------------------------------------------------------- studies
@dataclass
class Study:
    """A study on its reference grid: `image` is a vector image, one component per sequence."""

    image: sitk.Image
    sequences: tuple[str, ...]

    @property
    def reference(self) -> sitk.Image:
        return scalar_grid(self.image)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.GetSize())  # (I, J, K)

    def array(self, sequences: Seq[str] | None = None) -> np.ndarray:
        """Channel-first float32 array (C, I, J, K) of the requested sequences (default: all)."""
        arr = sitk.GetArrayFromImage(self.image)  # (K, J, I, C) or (K, J, I) for one component
        if arr.ndim == 3:
            arr = arr[..., None]
        arr = np.transpose(arr, (3, 2, 1, 0)).astype(np.float32, copy=False)
        if sequences is None:
            return arr
        return arr[[self.channel(s) for s in sequences]]

    def channel(self, seq: str) -> int:
        if seq not in self.sequences:
            raise StudyError(f"study lacks sequence {seq} (has {list(self.sequences)})")
        return self.sequences.index(seq)

    def require(self, needed: Seq[str]) -> None:
        missing = [s for s in needed if s not in self.sequences]
        if missing:
            raise StudyError(f"study lacks sequence(s) {missing} needed by this model (has {list(self.sequences)})")


def assemble_study(volumes: Mapping[str, sitk.Image], reference: str | None = None) -> Study:
    """Resample every sequence onto the reference sequence's grid and stack them.

    `volumes` maps sequence keys to 3D images in any geometry. Output order follows SEQUENCE_KEYS.
    """
    if not volumes:
        raise StudyError("a study needs at least one sequence")
    keys = [k for k in SEQUENCE_KEYS if k in volumes]
    try:
        check_keys(volumes.keys())
    except ValueError as e:
        raise StudyError(str(e)) from None
    checked = {k: validate_volume(volumes[k], k) for k in keys}
    ref_key = reference or reference_key(keys)
    if ref_key not in checked:
        raise StudyError(f"reference sequence {ref_key} is not in the study ({keys})")
    ref = scalar_grid(checked[ref_key])
    comps = [
        sitk.Cast(checked[k], sitk.sitkFloat32) if k == ref_key else resample_onto(checked[k], ref)
        for k in keys
    ]
    for c in comps:
        copy_geometry(c, ref)  # the reference component's own geometry, bit-identical for all
    image = sitk.Compose(comps) if len(comps) > 1 else sitk.Compose(comps[0])
    return Study(image=copy_geometry(image, ref), sequences=tuple(keys))


def study_from_array(array: np.ndarray, sequences: Seq[str], reference: sitk.Image) -> Study:
    """Build a Study from a channel-first (C, I, J, K) array on `reference`'s grid."""
    comps = [copy_geometry(sitk.GetImageFromArray(np.ascontiguousarray(a.T)), reference) for a in array]
    image = sitk.Compose(comps)
    return Study(copy_geometry(image, reference), tuple(sequences))


def write_study(study: Study, path: str, as_int16: bool = False) -> None:
    """Write a study file atomically; `as_int16` rounds values for compact synthetic cohorts."""
    img = study.image
    if as_int16:
        arr = np.clip(np.rint(sitk.GetArrayViewFromImage(img)), -32768, 32767).astype(np.int16)
        arr = arr[..., None] if arr.ndim == 3 else arr  # one-component vector images lose the axis
        img = copy_geometry(sitk.GetImageFromArray(arr, isVector=True), img)
    else:
        img = sitk.Image(img)
    img.SetMetaData(_NOTES_KEY, DESCRIP_PREFIX + ",".join(study.sequences))
    tmp = path + ".part.nii.gz"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written study


def parse_descrip(text: str) -> tuple[str, ...] | None:
    text = (text or "").strip()
    if not text.startswith(DESCRIP_PREFIX):
        return None
    keys = tuple(k.strip() for k in text[len(DESCRIP_PREFIX):].split(",") if k.strip())
    return keys or None


def read_study(path: str, name: str = "study") -> Study:
    """Read a study file (NIfTI-1 or NIfTI-2). Its descrip must list the sequences: a plain volume's
    sequence is never guessed."""
    img = read_volume(path, name)
    notes = img.GetMetaData("descrip") if img.HasMetaDataKey("descrip") else ""
    keys = parse_descrip(notes)
    if img.GetDimension() == 4:
        raise StudyError(f"{name}: expected a 3D multi-sequence study, got a 4D series of size {list(img.GetSize())}")
    if img.GetDimension() != 3:
        raise StudyError(f"{name}: expected a 3D volume, got {img.GetDimension()}D of size {list(img.GetSize())}")
    ncomp = img.GetNumberOfComponentsPerPixel()
    if keys is None:
        raise StudyError(
            f"{name}: not a parotid study file (its NIfTI descrip must list the sequences, e.g. "
            f"'{DESCRIP_PREFIX}CET1,T2,ADC'); {IMPORT_HINT}"
        )
    if len(keys) != ncomp:
        raise StudyError(f"{name}: header lists {len(keys)} sequences but the image has {ncomp} components")
    try:
        check_keys(keys)
    except ValueError as e:
        raise StudyError(f"{name}: {e}") from None
    if min(img.GetSize()) < 2:
        raise StudyError(f"{name}: volume of size {list(img.GetSize())} is not 3D (a 2D slice?)")
    img = sitk.Cast(img, sitk.sitkVectorFloat32) if ncomp > 1 else sitk.Compose(sitk.Cast(img, sitk.sitkFloat32))
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise StudyError(f"{name}: contains NaN or infinite voxels")
    return Study(image=img, sequences=keys)


def read_label_map(path: str, name: str = "label") -> np.ndarray:
    """A label map file as a uint8 (I, J, K) array (the package's array convention)."""
    return np.transpose(sitk.GetArrayFromImage(read_volume(path, name)), (2, 1, 0)).astype(np.uint8)


# --------------------------------------------------------------------------- boxes
def check_roi(roi, shape: Seq[int]) -> tuple[slice, slice, slice]:
    """Validate a ``[i0, i1, j0, j1, k0, k1]`` box against an (I, J, K) grid; return slices."""
    if not isinstance(roi, (list, tuple)) or len(roi) != 6:
        raise StudyError(f"roi must be a list of 6 voxel indices [i0, i1, j0, j1, k0, k1], got {roi!r}")
    try:
        vals = [int(v) for v in roi]
    except (TypeError, ValueError):
        raise StudyError(f"roi must contain integers, got {roi!r}") from None
    if any(float(v) != int(v) for v in roi if not isinstance(v, bool)):
        raise StudyError(f"roi must contain whole voxel indices, got {roi!r}")
    out = []
    for axis, (lo, hi, n) in enumerate(zip(vals[0::2], vals[1::2], shape)):
        name = "ijk"[axis]
        if hi < lo:
            raise StudyError(f"roi is inverted on axis {name}: {name}1={hi} < {name}0={lo}")
        if hi == lo:
            raise StudyError(f"roi is empty on axis {name}: {name}0 = {name}1 = {lo}")
        if lo < 0 or hi > n:
            raise StudyError(f"roi [{lo}, {hi}) on axis {name} lies outside the image (0..{n})")
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def mask_box(mask: np.ndarray, margin: int = 0) -> tuple[list[int], list[int]] | None:
    """(start, end) half-open box around the non-zero voxels of a mask, grown by `margin` voxels and
    clipped to the array (``monai.transforms.utils.generate_spatial_bounding_box``), or None if empty."""
    from monai.transforms.utils import generate_spatial_bounding_box

    m = np.asarray(mask)
    if not m.any():
        return None
    start, end = generate_spatial_bounding_box(m[None], select_fn=lambda x: x != 0, margin=margin,
                                               allow_smaller=True)
    return [int(v) for v in start], [int(v) for v in end]


def roi_from_mask(mask: np.ndarray) -> list[int] | None:
    """Tight half-open box ``[i0, i1, j0, j1, k0, k1]`` around the non-zero voxels of an (I, J, K) mask,
    or None if empty."""
    box = mask_box(mask)
    return None if box is None else [v for lo, hi in zip(*box) for v in (lo, hi)]


def grow_roi(roi: Seq[int], margin: Seq[float], min_margin: Seq[int], shape: Seq[int] | None = None) -> list[int]:
    """A box grown on each axis by ``max(round(margin * size), min_margin)`` voxels (per-axis values),
    clipped to `shape` if given (else it may extend beyond the image, e.g. for zero padding)."""
    out = []
    for axis, (lo, hi) in enumerate(zip(roi[0::2], roi[1::2])):
        lo, hi = int(lo), int(hi)
        m = max(int(round(margin[axis] * (hi - lo))), min_margin[axis])
        lo, hi = lo - m, hi + m
        if shape is not None:
            lo, hi = max(0, lo), min(int(shape[axis]), hi)
        out += [lo, hi]
    return out
