"""Geometry between 3D Slicer (RAS, IJK->RAS matrices) and SimpleITK / the server (LPS, ITK index).

Conventions
-----------
* Slicer stores a volume as a voxel array indexed ``[k, j, i]`` (``slicer.util.arrayFromVolume``) plus
  a 4x4 ``IJKToRAS`` matrix. SimpleITK's ``GetArrayFromImage`` uses the same ``[k, j, i]`` order, and
  ITK's index ``(i, j, k)`` is Slicer's IJK -- but ITK's physical space is LPS. The only difference is
  therefore the sign of the first two physical axes: ``RAS = diag(-1, -1, 1) @ LPS``.
* A server ``roi`` is ``[i0, i1, j0, j1, k0, k1]``: half-open voxel index ranges on the study's
  reference grid (Python slices ``[i0:i1, j0:j1, k0:k1]`` on an ``(I, J, K)`` array).
* Voxel ``i`` covers the continuous index interval ``[i - 0.5, i + 0.5]`` (ITK/Slicer: indices are
  voxel centres).
"""

from __future__ import annotations

import math

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
# A box face closer than this (in voxel index units) to a voxel face is taken to lie ON it. Slicer's
# markups ROI keeps its centre in float32 control points (vtkPoints), so a face written exactly on a
# voxel face reads back ~1e-6 mm off: 1e-6 index units was too tight (one extra voxel on 10/20 sample
# studies); 1e-3 voxel is far above float32 noise and far below anything a user can draw.
FACE_TOL = 1e-3


# --------------------------------------------------------------------------- matrices
def ijk_to_ras_from_sitk(image) -> np.ndarray:
    """4x4 IJK->RAS matrix of a SimpleITK image (what Slicer's ``SetIJKToRASMatrix`` expects)."""
    return ijk_to_ras_from_lps(image.GetSpacing(), image.GetDirection(), image.GetOrigin())


def ijk_to_ras_from_lps(spacing, direction, origin) -> np.ndarray:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return m


def lps_geometry_from_ijk_to_ras(ijk_to_ras):
    """(spacing, direction (9 floats, row-major), origin) in LPS from a 4x4 IJK->RAS matrix."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("IJK->RAS matrix has a zero-length axis")
    dir_ras = cols / spacing
    if not np.allclose(dir_ras.T @ dir_ras, np.eye(3), atol=1e-4):
        raise ValueError("IJK->RAS matrix is sheared (non-orthogonal axes); harden or resample the volume first")
    direction = LPS_TO_RAS @ dir_ras
    origin = LPS_TO_RAS @ m[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(v) for v in direction.ravel()), tuple(float(v) for v in origin)


def image_from_array(array_kji, ijk_to_ras, sitk=None):
    """SimpleITK image from a Slicer-style ``[k, j, i]`` array and its IJK->RAS matrix."""
    if sitk is None:
        import SimpleITK as sitk
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D scalar volume array, got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    spacing, direction, origin = lps_geometry_from_ijk_to_ras(ijk_to_ras)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def array_from_image(image, sitk=None):
    """``(array [k, j, i] or [k, j, i, c], IJK->RAS 4x4)`` of a SimpleITK image, ready for Slicer
    (``slicer.util.updateVolumeFromArray(node, array)`` + ``node.SetIJKToRASMatrix(matrix)``)."""
    if sitk is None:
        import SimpleITK as sitk
    return sitk.GetArrayFromImage(image), ijk_to_ras_from_sitk(image)


def same_grid(shape_a, ijk_to_ras_a, shape_b, ijk_to_ras_b, tol=1e-4) -> bool:
    """True if two volumes share size and IJK->RAS geometry (shapes in the same axis order)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(
        np.asarray(ijk_to_ras_a, dtype=float), np.asarray(ijk_to_ras_b, dtype=float), atol=tol)


# --------------------------------------------------------------------------- ROI boxes
def roi_corners_ras(center_ras, size, axes_ras=None) -> np.ndarray:
    """The 8 corners (8x3, RAS) of an oriented box.

    `axes_ras` is the ROI's 3x3 orientation: its COLUMNS are the ROI's own x, y, z axes in RAS (the
    upper-left 3x3 of a markups ROI's ObjectToWorld matrix); identity when None. `size` is the full
    edge length along each ROI axis (mm), `center_ras` the box centre.
    """
    c = np.asarray(center_ras, dtype=float).reshape(3)
    s = np.asarray(size, dtype=float).reshape(3)
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"ROI size must be non-negative, got {list(s)}")
    a = np.eye(3) if axes_ras is None else np.asarray(axes_ras, dtype=float).reshape(3, 3)
    signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    return c + (signs * s) @ a.T


def roi_to_box(center_ras, size, ras_to_ijk, shape_ijk, axes_ras=None, clip=True) -> list:
    """Voxel box ``[i0, i1, j0, j1, k0, k1]`` (half-open) covered by an oriented ROI.

    All 8 corners are mapped through `ras_to_ijk` (4x4, the reference volume's RAS->IJK) -- a rotated or
    flipped grid can put the extreme index of an axis at ANY corner, so two opposite corners are not
    enough (MONAI Label's stock plugin uses 2 and can return i0 > i1). Per axis the box holds every voxel
    whose extent ``[i - 0.5, i + 0.5]`` overlaps the corners' index range: ``i0 = floor(min + 0.5)``,
    ``i1 = ceil(max + 0.5)``; then it is clipped to ``[0, n)``. Raises ValueError (user message) when
    the ROI lies outside the image.
    """
    corners = roi_corners_ras(center_ras, size, axes_ras)
    m = np.asarray(ras_to_ijk, dtype=float).reshape(4, 4)
    ijk = corners @ m[:3, :3].T + m[:3, 3]
    lo = ijk.min(axis=0)
    hi = ijk.max(axis=0)
    box = []
    for axis in range(3):
        a = math.floor(lo[axis] + 0.5 + FACE_TOL)
        b = math.ceil(hi[axis] + 0.5 - FACE_TOL)
        if b <= a:  # zero-thickness ROI exactly on a voxel face: take the voxel above
            b = a + 1
        if clip:
            n = int(shape_ijk[axis])
            a, b = max(a, 0), min(b, n)
            if b <= a:
                raise ValueError(
                    f"the ROI box lies outside the reference image on axis {'IJK'[axis]} "
                    f"(index range {lo[axis]:.1f}..{hi[axis]:.1f}, image has 0..{n - 1}); move the box onto the tumour")
        box += [int(a), int(b)]
    return box


def box_to_roi(box, ijk_to_ras):
    """Inverse of :func:`roi_to_box` for display: ``(center_ras, size_mm, axes_ras)`` of the box's voxels.

    The ROI is aligned with the voxel grid; `axes_ras` is a proper rotation (det +1, for Slicer's
    markups ROI), the box edges lie on voxel faces.
    """
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    b = np.asarray(box, dtype=float).reshape(3, 2)
    center_ijk = (b[:, 0] + b[:, 1] - 1.0) / 2.0
    center = m[:3, :3] @ center_ijk + m[:3, 3]
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    axes = m[:3, :3] / spacing
    if np.linalg.det(axes) < 0:
        axes = axes.copy()
        axes[:, 2] *= -1
    size = (b[:, 1] - b[:, 0]) * spacing
    return center, size, axes
