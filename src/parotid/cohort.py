"""Reading a labelled cohort through MONAI Label's LocalDatastore (the same index the server uses): the one
cohort reader of training, evaluation and the input-check fit."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace

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
    clinical: dict = field(default_factory=dict)  # the cohort's cohort.csv row (age, sex, smoker), if any


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


def with_class_and_box(items: list[CohortItem]) -> list[CohortItem]:
    """The items a classifier trains and is evaluated on: a tumour class and a box (roi as ints)."""
    return [replace(it, tumor_class=str(it.tumor_class), roi=[int(v) for v in it.roi])
            for it in items if it.tumor_class and it.roi]


def read_clinical(folder: str) -> dict[str, dict]:
    """Rows of the cohort's ``cohort.csv`` (clinical variables written by parotid-synth) by study id."""
    path = os.path.join(folder, "cohort.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {row.get("study_id", ""): row for row in csv.DictReader(f)}


def load_classification_cohort(folder: str) -> list[CohortItem]:
    """The studies of a cohort folder with a tumour class and a box, with their clinical variables."""
    clinical = read_clinical(folder)
    return [replace(it, clinical=clinical.get(it.study_id, {})) for it in with_class_and_box(load_cohort(folder))]


# Fixed held-out part of a labelled datastore (issue 12): chosen by a hash of the study id, so it is
# the same in every training run, in every process and on every server replica, and a study keeps its
# role when others are added. Held-out studies are excluded from every training stage; they serve for
# calibration (temperature, undetermined thresholds) and for the promotion gate, which scores the
# candidate and the served checkpoint on exactly these studies.
HOLDOUT_FRACTION = 0.2


def holdout_score(study_id: str) -> float:
    """A number in [0, 1) fixed by the study id (SHA-1), independent of Python's hash seed."""
    import hashlib

    return int(hashlib.sha1(study_id.encode("utf-8")).hexdigest()[:12], 16) / float(16 ** 12)


def is_holdout(study_id: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    return holdout_score(study_id) < fraction


def split_holdout(items: list, fraction: float = HOLDOUT_FRACTION, min_holdout: int = 2) -> tuple[list, list]:
    """(training, held-out) parts of `items` (CohortItem or anything with `study_id`). When the hash
    picks fewer than `min_holdout` studies (tiny datastores), the lowest-scoring ones are held out."""
    ranked = sorted(items, key=lambda it: holdout_score(it.study_id))
    held = [it for it in ranked if holdout_score(it.study_id) < fraction]
    if len(held) < min_holdout and len(items) > min_holdout:
        held = ranked[:min_holdout]
    ids = {it.study_id for it in held}
    return [it for it in items if it.study_id not in ids], [it for it in items if it.study_id in ids]
