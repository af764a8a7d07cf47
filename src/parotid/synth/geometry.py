"""Acquisition geometry of the synthetic phantom: rotations, per-sequence grids, point sets.

Frames (all millimetres, LPS like ITK/DICOM):

* *head frame* ``q``: the phantom's anatomy is defined here — x towards the patient's left,
  y posterior, z superior, origin on the midline at the level of the parotid glands;
* *scanner frame* ``p`` (physical space of the images): ``p = R_head @ q + t_head`` for the
  patient's pose during the reference sequence; every other sequence adds a small rigid
  motion (``p = M_s (R_head q + t_head)``), which is the inter-sequence misregistration.

A grid (one acquisition) has its own spacing, size, origin and direction cosines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` from angles in degrees."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Rigid:
    """``p = R @ q + t`` (head frame -> scanner frame)."""

    R: np.ndarray
    t: np.ndarray

    def compose_after(self, other: "Rigid") -> "Rigid":
        """self ∘ other: first `other`, then `self`."""
        return Rigid(self.R @ other.R, self.R @ other.t + self.t)


@dataclass(frozen=True)
class Grid:
    size: tuple[int, int, int]          # (I, J, K)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray               # 3x3, columns = directions of the I, J, K axes

    @staticmethod
    def centred(centre, direction, spacing, fov) -> "Grid":
        size = tuple(int(max(2, round(f / s))) for f, s in zip(fov, spacing))
        direction = np.asarray(direction, dtype=np.float64)
        half = (np.array(size) - 1) * np.array(spacing) / 2.0
        origin = np.asarray(centre, dtype=np.float64) - direction @ half
        return Grid(size, tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction)

    @property
    def n(self) -> int:
        return int(np.prod(self.size))

    def image_from(self, arr_ijk: np.ndarray) -> sitk.Image:
        """sitk image from an (I, J, K) array on this grid."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr_ijk.T))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return img

    @staticmethod
    def of(img: sitk.Image) -> "Grid":
        return Grid(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                    np.array(img.GetDirection()).reshape(3, 3))
