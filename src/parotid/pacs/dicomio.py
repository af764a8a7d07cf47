"""The one writer of MR Image Storage series: a 3D SimpleITK volume -> single-frame MR datasets, one per
slice along the image's K axis (conformant: tests/test_dicom_conformance.py runs dciodvfy on it).

Two callers: the synthetic cohort (``parotid-synth --dicom``, ``parotid.synth.dicom``: deterministic
UIDs, full patient / acquisition attributes, rounded pixel values) and ``volume_to_mr_series`` (tests,
demos, benchmarks: small hand-made series for edge cases, random UIDs, rescaled pixel values)."""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["parotid-synth", "implementation"])  # fixed: files stay identical


def ds_value(v: float) -> str:
    """DICOM DS (decimal string, <= 16 characters), 6 decimals."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def rounded_pixels(arr: np.ndarray) -> tuple[np.ndarray, Any, Any]:
    """Stored int16 values = the rounded intensities (rescale 1 / 0)."""
    return np.clip(np.rint(arr), -32768, 32767).astype(np.int16), "1", "0"


def rescaled_pixels(arr: np.ndarray) -> tuple[np.ndarray, Any, Any]:
    """Stored int16 values with a rescale slope / intercept when the intensities are not integers or span
    more than 30000."""
    lo, hi = float(arr.min()), float(arr.max())
    slope = max((hi - lo) / 30000.0, 1e-6) if (hi - lo) > 30000 or not np.allclose(arr, np.round(arr)) else 1.0
    inter = lo if slope != 1.0 else 0.0
    return np.round((arr - inter) / slope).astype(np.int16), slope, inter


def mr_series_datasets(img: sitk.Image, attributes: Mapping[str, Any], sop_uid: Callable[[int], str],
                       pixels: Callable[[np.ndarray], tuple[np.ndarray, Any, Any]] = rescaled_pixels) -> list[Dataset]:
    """One MR Image Storage dataset per K slice of `img`. `attributes` (patient, study, series and
    acquisition attributes: UIDs, names, dates, SeriesDescription, SeriesNumber, ScanningSequence, timing,
    ...) are set on every slice over the defaults here; geometry, pixel data and instance attributes come
    from the image; `sop_uid(k)` names slice k."""
    stored, slope, inter = pixels(sitk.GetArrayFromImage(img))  # (K, J, I)
    D = np.array(img.GetDirection()).reshape(3, 3)
    sp = img.GetSpacing()
    org = np.array(img.GetOrigin())
    iop = [ds_value(v) for v in (*D[:, 0], *D[:, 1])]
    out = []
    for k in range(stored.shape[0]):
        pos = org + D[:, 2] * sp[2] * k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid(k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # value 3: MR defined terms (PS3.3 C.8.3.1.1.1)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.Modality = "MR"
        ds.PatientBirthDate = ""
        ds.BodyPartExamined = "HEADNECK"  # unpaired part: no Laterality (2C) needed
        ds.PatientPosition = "HFS"  # Type 2C (required for MR): head first supine
        ds.SequenceVariant, ds.ScanOptions = "NONE", ""
        ds.PositionReferenceIndicator = ""
        ds.RescaleType = "US"
        for key, value in attributes.items():
            setattr(ds, key, value)
        ds.SliceThickness = ds.SpacingBetweenSlices = ds_value(sp[2])
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ds_value(v) for v in pos]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = ds_value(float(np.dot(pos, D[:, 2])))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.PixelSpacing = [ds_value(sp[1]), ds_value(sp[0])]  # row spacing (between rows = J), column spacing (I)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = inter, slope
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        out.append(ds)
    return out


def volume_to_mr_series(
    img: sitk.Image,
    description: str,
    study_uid: str,
    series_number: int = 1,
    patient_id: str = "SYNTH-0000",
    patient_name: str = "Synthetic^Patient",
    frame_of_reference_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """A small hand-made T2-like series (random UIDs unless given) for tests, demos and benchmarks."""
    now = datetime.datetime(2024, 1, 1, 12, 0, 0)
    attributes = {
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid or generate_uid(),
        "FrameOfReferenceUID": frame_of_reference_uid or generate_uid(),
        "PatientID": patient_id, "PatientName": patient_name, "PatientSex": "O",
        "StudyDate": now.strftime("%Y%m%d"), "SeriesDate": now.strftime("%Y%m%d"), "ContentDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"), "SeriesTime": now.strftime("%H%M%S"), "ContentTime": now.strftime("%H%M%S"),
        "Manufacturer": "synthetic", "SeriesDescription": description, "SeriesNumber": series_number,
        "ScanningSequence": "SE", "MRAcquisitionType": "2D",
        "RepetitionTime": 500, "EchoTime": 10, "EchoTrainLength": 1, "MagneticFieldStrength": 1.5,
    }
    return mr_series_datasets(img, attributes, lambda k: generate_uid())


def save_series(datasets: Sequence[Dataset], folder: str, prefix: str = "") -> list[str]:
    """``folder/<prefix>0001.dcm ...`` in the given order."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = os.path.join(folder, f"{prefix}{i + 1:04d}.dcm")
        ds.save_as(p, write_like_original=False)
        paths.append(p)
    return paths
