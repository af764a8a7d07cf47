"""Assemble a multi-sequence study file from per-sequence volumes, the way the server expects it.

Same algorithm and file format as the server's ``parotid.study.assemble_study`` / ``write_study``
(checked bit-for-bit by ``tests/test_slicer_lib.py``), re-implemented here because ``parotid`` is not
installed inside 3D Slicer:

* every sequence is resampled in PHYSICAL space (identity transform, linear, 0 outside coverage,
  float32) onto the grid of the reference sequence (CE-T1, else T2, ...);
* components are stacked in the canonical sequence order into ONE vector NIfTI;
* the NIfTI ``descrip`` header field names the components: ``parotid:CET1,T2,ADC``.

Inputs are SimpleITK images (LPS). From Slicer, build them with
:func:`ParotidTumorLib.geometry.image_from_array` from ``arrayFromVolume`` + ``GetIJKToRASMatrix``.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from .sequences import SEQUENCE_KEYS, reference_key

DESCRIP_PREFIX = "parotid:"
_NOTES_KEY = "ITK_FileNotes"  # ITK's NIfTI writer puts this metadata entry into the `descrip` field


class StudyInputError(ValueError):
    """The per-sequence volumes cannot form a study (message is meant for the user)."""


def _sitk():
    import SimpleITK as sitk

    return sitk


def _validate(img, key):
    sitk = _sitk()
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise StudyInputError(f"{key}: expected a 3D volume, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise StudyInputError(f"{key}: expected a scalar volume, got {img.GetNumberOfComponentsPerPixel()} components")
    if min(img.GetSize()) < 2:
        raise StudyInputError(f"{key}: volume of size {list(img.GetSize())} is not 3D (a single slice?)")
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise StudyInputError(f"{key}: contains NaN or infinite voxels")
    return img


def _copy_geometry(img, ref):
    img.SetSpacing(ref.GetSpacing())
    img.SetOrigin(ref.GetOrigin())
    img.SetDirection(ref.GetDirection())
    return img


def assemble(volumes: dict, reference: str | None = None):
    """``{key: sitk.Image}`` -> ``(vector sitk.Image on the reference grid, tuple of keys)``."""
    sitk = _sitk()
    if not volumes:
        raise StudyInputError("select at least one sequence volume")
    unknown = [k for k in volumes if k not in SEQUENCE_KEYS]
    if unknown:
        raise StudyInputError(f"unknown sequence(s) {unknown}; known: {list(SEQUENCE_KEYS)}")
    keys = [k for k in SEQUENCE_KEYS if k in volumes]
    checked = {k: _validate(volumes[k], k) for k in keys}
    ref_key = reference or reference_key(keys)
    if ref_key not in checked:
        raise StudyInputError(f"reference sequence {ref_key} is not among the selected volumes ({keys})")
    ref = _copy_geometry(sitk.Image(checked[ref_key].GetSize(), sitk.sitkUInt8), checked[ref_key])
    comps = []
    for k in keys:
        if k == ref_key:
            c = sitk.Cast(checked[k], sitk.sitkFloat32)
        else:
            c = sitk.Resample(checked[k], ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        comps.append(_copy_geometry(c, ref))
    image = sitk.Compose(comps)
    return _copy_geometry(image, ref), tuple(keys)


def write(image, keys, path: str) -> str:
    """Write a study file (vector NIfTI, descrip ``parotid:K1,K2``); returns `path`."""
    sitk = _sitk()
    img = sitk.Image(image)
    img.SetMetaData(_NOTES_KEY, DESCRIP_PREFIX + ",".join(keys))
    tmp = path + ".part.nii.gz"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path


def read_descrip(path: str):
    """Sequence keys from a study file's NIfTI descrip, or None."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    text = reader.GetMetaData("descrip").strip() if reader.HasMetaDataKey("descrip") else ""
    if not text.startswith(DESCRIP_PREFIX):
        return None
    return tuple(k.strip() for k in text[len(DESCRIP_PREFIX):].split(",") if k.strip())


def make_study_id(name: str, image=None) -> str:
    """A datastore-safe study id from a volume/patient name (+ 8 hex of the image content if given),
    e.g. ``"Case 7 (CE-T1)"`` -> ``"case-7-ce-t1-1a2b3c4d"``."""
    base = re.sub(r"[^a-z0-9]+", "-", (name or "study").lower()).strip("-")[:40] or "study"
    if image is None:
        return base
    sitk = _sitk()
    h = hashlib.sha1(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    h.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    return f"{base}-{h.hexdigest()[:8]}"


def read_components(path: str) -> dict:
    """A study file split back into per-sequence volumes: ``{key: (array [k, j, i], IJK->RAS 4x4)}``
    (all on the reference grid), e.g. to load a study fetched with Next sample into Slicer."""
    sitk = _sitk()
    from .geometry import ijk_to_ras_from_sitk

    keys = read_descrip(path)
    if not keys:
        raise StudyInputError(f"{os.path.basename(path)} is not a parotid study file (no 'parotid:' descrip)")
    img = sitk.ReadImage(path)
    if img.GetNumberOfComponentsPerPixel() != len(keys):
        raise StudyInputError(f"study header lists {len(keys)} sequences but the image has {img.GetNumberOfComponentsPerPixel()}")
    m = ijk_to_ras_from_sitk(img)
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:
        arr = arr[..., None]
    return {k: (np.ascontiguousarray(arr[..., c]).astype(np.float32), m) for c, k in enumerate(keys)}
