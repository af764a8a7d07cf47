"""DICOM MR series of a SYNTHETIC study (pydicom 2.4): one series per sequence.

``DIR/dicom/<study_id>/<SEQ>/IM0001.dcm ...``, one file per slice of the native acquisition.
UIDs are deterministic (``generate_uid(entropy_srcs=[...])`` from the cohort seed, the study id,
the sequence and the slice), one StudyInstanceUID per study, one FrameOfReferenceUID shared by
all series of a study (same scanner session).
"""

from __future__ import annotations

import os

import SimpleITK as sitk
from pydicom.uid import generate_uid

from parotid.pacs.dicomio import ds_value, mr_series_datasets, rounded_pixels, save_series
from parotid.synth.phantom import SERIES_DESCRIPTION, Rendered

SERIES_NUMBER = {"T1": 1, "T2": 2, "CET1": 5, "DWI_B0": 3, "DWI_B1000": 4, "ADC": 6}
B_VALUE = {"DWI_B0": 0, "DWI_B1000": 1000}
# Nominal acquisition parameters of a 3 T head-and-neck protocol (ms; echo train length), stated so the
# MR Image module is complete (EchoTime, EchoTrainLength are Type 2, RepetitionTime 2C). The phantom's
# contrast does not depend on them. ADC is derived from the diffusion series and repeats their values.
TIMING = {"T1": (600.0, 10.0, 3), "T2": (4000.0, 90.0, 15), "CET1": (6.5, 2.4, 1),
          "DWI_B0": (5000.0, 70.0, 1), "DWI_B1000": (5000.0, 70.0, 1), "ADC": (5000.0, 70.0, 1)}
DEIDENTIFICATION_METHOD = "SYNTHETIC phantom (parotid-synth), never patient data"  # LO: <= 64 chars


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["parotid-synth", *[str(p) for p in parts]])


def write_series(img: sitk.Image, folder: str, key: str, study: dict) -> list[str]:
    """Write one scalar image as an MR series, one slice (along the image's K axis) per file
    (``parotid.pacs.dicomio``, the one MR writer, with this cohort's attributes)."""
    tr, te, etl = TIMING[key]
    attributes = {
        # value 3: MR defined terms (PS3.3 C.8.3.1.1.1)
        "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION MAP"] if key == "ADC" else ["ORIGINAL", "PRIMARY", "OTHER"],
        "StudyDate": study["date"], "SeriesDate": study["date"], "ContentDate": study["date"],
        "StudyTime": "090000", "SeriesTime": "090000", "ContentTime": "090000",
        "Manufacturer": "parotid-synth (SYNTHETIC PHANTOM)", "InstitutionName": "SYNTHETIC",
        "StudyDescription": "SYNTHETIC parotid MRI phantom", "SeriesDescription": SERIES_DESCRIPTION[key],
        "PatientName": f"SYNTHETIC^{study['id']}", "PatientID": study["id"], "PatientSex": study["sex"],
        "PatientAge": f"{int(study['age']):03d}Y", "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": DEIDENTIFICATION_METHOD,  # Type 1C with PatientIdentityRemoved YES
        "ScanningSequence": "EP" if key.startswith("DWI") or key == "ADC" else ("GR" if key == "CET1" else "SE"),
        "MRAcquisitionType": "3D" if key == "CET1" else "2D", "MagneticFieldStrength": "3",
        "RepetitionTime": ds_value(tr), "EchoTime": ds_value(te), "EchoTrainLength": etl,
        "StudyInstanceUID": study["study_uid"], "SeriesInstanceUID": _uid(study["seed"], study["id"], key, "series"),
        "SeriesNumber": SERIES_NUMBER[key], "FrameOfReferenceUID": study["for_uid"],
        "ImageComments": "SYNTHETIC PHANTOM - NOT PATIENT DATA",
        "RescaleType": "1E-6 MM2/S" if key == "ADC" else "US", "BurnedInAnnotation": "NO",
        **({"DiffusionBValue": B_VALUE[key]} if key in B_VALUE else {}),
    }
    datasets = mr_series_datasets(img, attributes, lambda k: _uid(study["seed"], study["id"], key, "sop", k),
                                  pixels=rounded_pixels)
    return save_series(datasets, folder, prefix="IM")


def write_dicom_study(r: Rendered, folder: str) -> dict[str, str]:
    """Write every present sequence of a rendered study; returns {sequence: series folder}."""
    c = r.case
    study = {"id": c.study_id, "seed": c.seed, "sex": c.sex, "age": c.age,
             "date": f"2025{1 + c.index % 12:02d}{1 + c.index % 28:02d}",
             "study_uid": _uid(c.seed, c.study_id, "study"), "for_uid": _uid(c.seed, c.study_id, "frame-of-reference")}
    out = {}
    for key, img in r.raw.items():
        d = os.path.join(folder, key)
        write_series(img, d, key, study)
        out[key] = d
    return out
