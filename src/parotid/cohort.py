"""Reading a labelled cohort through MONAI Label's LocalDatastore (the same index the server uses)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from parotid.labels import INFO_ROI, INFO_TUMOR_CLASS


@dataclass(frozen=True)
class CohortItem:
    study_id: str
    image: str
    label: str
    tumor_class: str | None
    roi: list[int] | None
    info: dict


# Image file extensions, longest first. Ids keep every other part of a file name: dotted DICOM-style
# names (1.2.840.113619.2.55.nii.gz) are distinct studies, not all "1".
IMAGE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def split_image_name(name: str) -> tuple[str, str]:
    """(id, extension) of an image file name: only a known image extension is stripped."""
    name = os.path.basename(name)
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def study_id_of(path: str) -> str:
    return split_image_name(path)[0]


def open_datastore(folder: str) -> LocalDatastore:
    return LocalDatastore(folder, extensions=("*.nii.gz",), auto_reload=False)


def cohort_items(datastore) -> list[CohortItem]:
    """Studies that have a final label, with their label info (tumor_class, roi)."""
    items = []
    for d in datastore.datalist():
        study_id = study_id_of(d["image"])
        info = datastore.get_label_info(study_id, DefaultLabelTag.FINAL) or {}
        items.append(
            CohortItem(study_id, d["image"], d["label"], info.get(INFO_TUMOR_CLASS), info.get(INFO_ROI), info)
        )
    return sorted(items, key=lambda it: it.study_id)


def load_cohort(folder: str) -> list[CohortItem]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cohort folder not found: {folder}")
    return cohort_items(open_datastore(folder))
