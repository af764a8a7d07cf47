"""DICOM MR series of a SYNTHETIC study (pydicom 2.4): one series per sequence.

``DIR/dicom/<study_id>/<SEQ>/IM0001.dcm ...``, one file per slice of the native acquisition.
UIDs are deterministic (``generate_uid(entropy_srcs=[...])`` from the cohort seed, the study id,
the sequence and the slice), one StudyInstanceUID per study, one FrameOfReferenceUID shared by
all series of a study (same scanner session).
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from parotid.synth.phantom import SERIES_DESCRIPTION, Rendered

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
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


def _ds(v: float) -> str:
    """DICOM DS (decimal string, <= 16 characters)."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def write_series(img: sitk.Image, folder: str, key: str, study: dict) -> list[str]:
    """Write one scalar image as an MR series, one slice (along the image's K axis) per file."""
    os.makedirs(folder, exist_ok=True)
    arr = np.clip(np.rint(sitk.GetArrayFromImage(img)), -32768, 32767).astype(np.int16)  # (K, J, I)
    D = np.array(img.GetDirection()).reshape(3, 3)
    sp = img.GetSpacing()
    org = np.array(img.GetOrigin())
    series_uid = _uid(study["seed"], study["id"], key, "series")
    iop = [_ds(v) for v in (*D[:, 0], *D[:, 1])]
    paths = []
    for k in range(arr.shape[0]):
        pos = org + D[:, 2] * sp[2] * k
        sop = _uid(study["seed"], study["id"], key, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = _uid("implementation")
        path = os.path.join(folder, f"IM{k + 1:04d}.dcm")
        ds = FileDataset(path, Dataset(), file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        # value 3: MR defined terms (PS3.3 C.8.3.1.1.1)
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION MAP"] if key == "ADC" else ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["date"]
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "parotid-synth (SYNTHETIC PHANTOM)"
        ds.InstitutionName = "SYNTHETIC"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC parotid MRI phantom"
        ds.SeriesDescription = SERIES_DESCRIPTION[key]
        ds.PatientName = f"SYNTHETIC^{study['id']}"
        ds.PatientID = study["id"]
        ds.PatientBirthDate = ""
        ds.PatientSex = study["sex"]
        ds.PatientAge = f"{int(study['age']):03d}Y"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD  # Type 1C with PatientIdentityRemoved YES
        ds.BodyPartExamined = "HEADNECK"
        ds.ScanningSequence = "EP" if key.startswith("DWI") or key == "ADC" else ("GR" if key == "CET1" else "SE")
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D" if key == "CET1" else "2D"
        ds.MagneticFieldStrength = "3"
        tr, te, etl = TIMING[key]
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = _ds(tr), _ds(te), etl
        ds.PatientPosition = "HFS"  # Type 2C (required for MR): head first supine
        ds.SliceThickness = _ds(sp[2])
        ds.SpacingBetweenSlices = _ds(sp[2])
        if key in B_VALUE:
            ds.DiffusionBValue = B_VALUE[key]
        ds.StudyInstanceUID = study["study_uid"]
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = SERIES_NUMBER[key]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = study["for_uid"]
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(pos, D[:, 2])))
        ds.ImageComments = "SYNTHETIC PHANTOM - NOT PATIENT DATA"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]  # row spacing (between rows = J), column spacing (I)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.RescaleType = "1E-6 MM2/S" if key == "ADC" else "US"
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = np.ascontiguousarray(arr[k]).tobytes()
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


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
