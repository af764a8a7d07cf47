"""The rules a label and its info must satisfy before any datastore stores them -- one module for the
study-folder datastore (apps/parotid/lib/datastore.py) and the DICOMweb datastore
(parotid.pacs.datastore), so nothing invalid reaches the index or the PACS:

* the label is a 3D scalar map on the study's reference grid (same size, origin, spacing, direction);
* its values are the segmentation labels (0 background, 1 parotid gland, 2 tumour: ``labels.py``);
* ``tumor_class`` is a class of a classification label set the server serves (``labels.py``);
* ``roi`` is a ``[i0, i1, j0, j1, k0, k1]`` box inside the study.

Every violation is a ``StudyError`` whose message says what is wrong (HTTP 422 at the API).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from parotid.labels import INFO_ROI, INFO_TUMOR_CLASS, SEGMENTATION_LABELS, classification_label_sets
from parotid.study import Study, StudyError, check_roi, grid_differences, read_volume

GRID_TOLERANCE = 1e-3  # mm (origin/spacing) and direction cosines; NIfTI stores geometry as float32


def check_label_info(info: Mapping[str, Any], shape: Sequence[int] | None) -> None:
    """`tumor_class` from a served label set; `roi` inside a grid of `shape` (I, J, K). `shape` may be
    None only when `info` has no `roi`."""
    cls = info.get(INFO_TUMOR_CLASS)
    if cls is not None:
        sets = classification_label_sets()
        if not isinstance(cls, str) or not any(s.accepts(cls) for s in sets.values()):
            known = "; ".join(f"{n}: {list(s.classes)}" for n, s in sorted(sets.items()))
            raise StudyError(f"tumor_class {cls!r} is not a class of a label set this server serves ({known})")
    if info.get(INFO_ROI) is not None:
        if shape is None:
            raise ValueError("check_label_info: a roi needs the study's shape")
        check_roi(info[INFO_ROI], shape)


def check_label_image(label: sitk.Image, reference: sitk.Image) -> None:
    """A 3D scalar label map on `reference`'s grid with segmentation label values only."""
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(f"label: expected a 3D scalar label map, got {label.GetDimension()}D with "
                         f"{label.GetNumberOfComponentsPerPixel()} component(s)")
    diff = grid_differences(label, reference, tol=GRID_TOLERANCE)
    if diff:
        raise StudyError(f"label geometry does not match the study's reference grid: {'; '.join(diff)} "
                         "(label vs study); resample the label onto the study first")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
    allowed = set(SEGMENTATION_LABELS.values())
    if not values <= allowed:
        names = ", ".join(f"{v} {k}" for k, v in SEGMENTATION_LABELS.items())
        raise StudyError(f"label contains values {sorted(values - allowed)}; allowed: {names}")


def validate_label(label_path: str, study: Study, info: Mapping[str, Any]) -> None:
    """All rules for a label file about to be saved with `info` on `study`."""
    check_label_info(info, study.shape)
    check_label_image(read_volume(label_path, "label"), study.reference)
