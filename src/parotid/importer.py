"""Bring your own cohort: per-sequence NIfTI files or DICOM series + a label table -> study folder.

    parotid-import --src my_cohort --table my_cohort/labels.csv --out studies/

Input (see docs/data-format.md):

    my_cohort/<study_id>/<anything naming the sequence>.nii.gz   (NIfTI-1/-2, .nrrd, .mha, or a DICOM folder:
                                                                  classic or Enhanced MR, geometry checked)
    my_cohort/<study_id>/label.nii.gz                            optional: 1 gland, 2 tumour, any geometry
    labels.csv: study_id, tumor_class[, i0, i1, j0, j1, k0, k1][, age, sex, smoker][, site]

Each study's sequences are recognised by `parotid.sequences.match_sequence` on the file/folder
name, resampled onto the reference grid (`parotid.study.assemble_study`), written as one study
file, and registered with MONAI Label's LocalDatastore together with the final label and its
info (`tumor_class`, `roi`). A study that fails is reported and skipped; the rest are imported.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from parotid.cohort import open_datastore
from parotid.pacs.convert import read_dicom_folder
from parotid.labels import INFO_ROI, INFO_TUMOR_CLASS, SEGMENTATION_LABELS, TUMOR, get_label_set
from parotid.sequences import match_sequence
from parotid.study import StudyError, assemble_study, check_roi, read_volume, roi_from_mask, write_study

LABEL_NAMES = ("label", "labels", "seg", "segmentation", "mask")
VOLUME_EXT = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _stem(name: str) -> str:
    for ext in VOLUME_EXT:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def find_inputs(folder: str) -> tuple[dict[str, str], str | None]:
    """Sequence key -> path, and the label path (if any) in one study folder."""
    seqs: dict[str, str] = {}
    label = None
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (os.path.isdir(path) or name.lower().endswith(VOLUME_EXT)):
            continue
        stem = _stem(name)
        if stem.lower() in LABEL_NAMES:
            label = path
            continue
        key = match_sequence(stem)
        if key is None:
            continue
        if key in seqs:
            raise StudyError(f"two inputs look like {key}: {os.path.basename(seqs[key])} and {name}")
        seqs[key] = path
    if not seqs:
        raise StudyError("no file or DICOM folder named like a known sequence (e.g. T2.nii.gz, CET1/, ADC.nii.gz)")
    return seqs, label


def read_input(path: str, key: str) -> sitk.Image:
    """One sequence: an image file, or a folder of DICOM files whose geometry is checked (classic or
    Enhanced multi-frame MR); of several series in one folder the one whose SeriesDescription matches
    `key` is read, else the folder is refused with the list of series."""
    if os.path.isdir(path):
        return read_dicom_folder(path, key, key=key)
    return read_volume(path, key)


def read_table(path: str) -> dict[str, dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "study_id" not in rows[0]:
        raise ValueError(f"{path}: needs a header with at least 'study_id' (and 'tumor_class')")
    return {r["study_id"].strip(): r for r in rows}


def import_study(src: str, study_id: str, row: dict, datastore) -> dict:
    seq_paths, label_path = find_inputs(src)
    study = assemble_study({k: read_input(p, k) for k, p in seq_paths.items()})
    info: dict = {"sequences": list(study.sequences)}
    cls = (row.get(INFO_TUMOR_CLASS) or "").strip()
    if cls:
        if not get_label_set("subtype4").accepts(cls):
            raise StudyError(f"tumor_class '{cls}' is not one of {list(get_label_set('subtype4').classes)}")
        info[INFO_TUMOR_CLASS] = cls
    for key in ("age", "sex", "smoker", "site"):  # site: hospital / scanner (parotid-eval external)
        if row.get(key, "").strip():
            info[key] = row[key].strip()
    roi_cols = ["i0", "i1", "j0", "j1", "k0", "k1"]
    label_arr = None
    if label_path:
        label = read_volume(label_path, "label")
        label = sitk.Resample(label, study.reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        label_arr = np.transpose(sitk.GetArrayFromImage(label), (2, 1, 0))
        bad = set(np.unique(label_arr).tolist()) - set(SEGMENTATION_LABELS.values())
        if bad:
            raise StudyError(f"label has values {sorted(bad)}; expected 0 background, 1 gland, 2 tumour")
    if all(row.get(c, "").strip() for c in roi_cols):
        roi = [int(row[c]) for c in roi_cols]
        check_roi(roi, study.shape)
        info[INFO_ROI] = roi
    elif label_arr is not None and (label_arr == TUMOR).any():
        info[INFO_ROI] = roi_from_mask(label_arr == TUMOR)
    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, f"{study_id}.nii.gz")
        write_study(study, image_path)
        datastore.add_image(study_id, image_path, {"sequences": list(study.sequences)})  # copies into `out`
        if label_arr is not None or cls:
            if label_arr is None:  # class only: an empty label map keeps MONAI Label's final-label bookkeeping
                label_arr = np.zeros(study.shape, np.uint8)
            lab_img = sitk.GetImageFromArray(np.ascontiguousarray(label_arr.T))
            lab_img.CopyInformation(study.reference)
            label_path = os.path.join(tmp, "label.nii.gz")
            sitk.WriteImage(lab_img, label_path, useCompression=True)
            datastore.save_label(study_id, label_path, "final", info)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Import a cohort (per-sequence NIfTI/DICOM + label table) into a study folder.")
    ap.add_argument("--src", required=True, help="folder with one sub-folder per study")
    ap.add_argument("--table", required=True, help="CSV with study_id, tumor_class[, i0..k1][, age, sex, smoker][, site]")
    ap.add_argument("--out", required=True, help="study folder to create or extend (served with --studies)")
    a = ap.parse_args(argv)
    try:
        table = read_table(a.table)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    os.makedirs(a.out, exist_ok=True)
    datastore = open_datastore(a.out)
    failed = []
    for study_id, row in tqdm(sorted(table.items()), desc="import"):
        src = os.path.join(a.src, study_id)
        try:
            if not os.path.isdir(src):
                raise StudyError(f"no folder {src}")
            import_study(src, study_id, row, datastore)
        except StudyError as e:
            failed.append(study_id)
            print(f"SKIPPED {study_id}: {e}", file=sys.stderr)
    print(f"imported {len(table) - len(failed)} of {len(table)} studies into {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
